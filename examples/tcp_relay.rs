//! Benchmark reference, not part of infergate: the cheapest proxy there is. It accepts TCP
//! connections and copies bytes both ways to one upstream, with no HTTP/2 or gRPC parsing
//! at all, on one thread. Whatever one extra hop on loopback costs on a machine (two more
//! socket writes and reads, two more wake-ups), this pays and nothing more, so its ratio to
//! direct Triton is the floor for any gRPC front end there (`loadtest/compare.sh`).
//!
//!     cargo run --release --example tcp_relay -- 127.0.0.1:9001 127.0.0.1:8001

use tokio::{
    io::copy_bidirectional,
    net::{TcpListener, TcpStream},
};

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        eprintln!("usage: tcp_relay LISTEN_ADDR UPSTREAM_ADDR");
        std::process::exit(2);
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(&listen).await?;
        loop {
            let (mut client, _) = listener.accept().await?;
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let _ = client.set_nodelay(true);
                let Ok(mut server) = TcpStream::connect(&upstream).await else {
                    return;
                };
                let _ = server.set_nodelay(true);
                let _ = copy_bidirectional(&mut client, &mut server).await;
            });
        }
    })
}
