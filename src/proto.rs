//! Code generated from `proto/` by build.rs: the Open Inference Protocol messages, infergate's
//! server trait and the client it uses towards Triton.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod inference {
    tonic::include_proto!("inference");
}

/// `infergate.tasks.v1`, nested as its package so its references to `inference` resolve.
pub mod infergate {
    pub mod tasks {
        #[allow(clippy::all, clippy::pedantic, missing_docs)]
        pub mod v1 {
            tonic::include_proto!("infergate.tasks.v1");
        }
    }
}
pub use infergate::tasks::v1 as tasks;

/// KEDA's `externalscaler` service, served by [`crate::scaler`].
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod externalscaler {
    tonic::include_proto!("externalscaler");
}

/// Encoded descriptors of every message in `proto/`, for gRPC reflection and proto→JSON.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/inference_descriptor.bin"));

use std::sync::OnceLock;

use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};

fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::decode(FILE_DESCRIPTOR_SET).expect("descriptor set built by build.rs")
    })
}

/// Renders a message as Triton's HTTP API does: proto field names, enum names, 64-bit
/// integers as JSON numbers and default values printed.
/// `full_name` is the message's protobuf name, e.g. `inference.ModelConfig`.
pub fn to_triton_json<M: prost::Message>(msg: &M, full_name: &str) -> serde_json::Value {
    let desc = pool()
        .get_message_by_name(full_name)
        .expect("message is in the descriptor set");
    let dynamic = DynamicMessage::decode(desc, msg.encode_to_vec().as_slice())
        .expect("a message re-decodes with its own descriptor");
    let opts = SerializeOptions::new()
        .stringify_64_bit_integers(false)
        .use_proto_field_name(true)
        .skip_default_fields(false);
    dynamic
        .serialize_with_options(serde_json::value::Serializer, &opts)
        .unwrap_or(serde_json::Value::Null)
}
