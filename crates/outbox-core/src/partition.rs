//! Relay partitions: how aggregates are spread over relays.
//!
//! Every aggregate maps to one of [`PARTITIONS`] partitions by a hash that is fixed forever
//! (FNV-1a, 64 bit), so the mapping survives upgrades and agrees between writers and relays on
//! different machines. A relay works only on the partitions it holds a lease on, and a
//! partition has at most one holder at a time; that is what keeps two relays from reordering
//! one aggregate.

/// Number of relay partitions. Part of the stored format: changing it needs a migration.
pub const PARTITIONS: u16 = 64;

/// A partition number in `0..PARTITIONS`.
pub type PartitionNo = u16;

/// FNV-1a over `kind`, a zero byte, and `id`.
pub fn aggregate_hash(kind: &str, id: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    for &b in kind.as_bytes().iter().chain(&[0u8]).chain(id.as_bytes()) {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(PRIME);
    }
    hash
}

/// The partition of an aggregate.
pub fn partition_of(kind: &str, id: &str) -> PartitionNo {
    (aggregate_hash(kind, id) % u64::from(PARTITIONS)) as PartitionNo
}

/// A 32-bit key for per-aggregate locks (stores that need one to serialise writers of one
/// aggregate use it together with a fixed class id).
pub fn aggregate_lock_key(kind: &str, id: &str) -> i32 {
    let h = aggregate_hash(kind, id);
    ((h >> 32) ^ h) as u32 as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_stable() {
        // Known FNV-1a 64 values: these must never change (they are stored in every row).
        assert_eq!(aggregate_hash("", ""), 0xaf63_bd4c_8601_b7df);
        assert_eq!(partition_of("batch", "b-1"), partition_of("batch", "b-1"));
        assert_ne!(aggregate_hash("ab", "c"), aggregate_hash("a", "bc"));
    }

    #[test]
    fn partitions_are_spread() {
        let mut counts = [0u32; PARTITIONS as usize];
        for i in 0..6400 {
            counts[partition_of("essay", &format!("essay-{i}")) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c > 50 && c < 150), "{counts:?}");
    }
}
