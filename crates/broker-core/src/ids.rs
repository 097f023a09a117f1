//! Random identifiers: message ids and lease tokens, without a system call each.
//!
//! `Uuid::new_v4` asks the kernel for 16 random bytes every time: one `getrandom` call per
//! message in the API and per claim in the drainer. Here each thread asks for
//! [`BATCH`] bytes at once and hands them out 16 at a time. The bytes are the kernel's, as
//! before; only the call is shared.

use std::cell::RefCell;

/// Random bytes fetched at once: the ids of 256 messages.
const BATCH: usize = 4096;

struct Batch {
    bytes: Box<[u8; BATCH]>,
    /// The bytes from here on are not handed out yet.
    next: usize,
}

thread_local! {
    static RANDOM: RefCell<Batch> = RefCell::new(Batch {
        bytes: Box::new([0; BATCH]),
        next: BATCH,
    });
}

/// A random (version 4) UUID.
pub fn uuid_v4() -> uuid::Uuid {
    let bytes = RANDOM.with_borrow_mut(|batch| {
        if batch.next + 16 > BATCH {
            if getrandom::fill(&mut batch.bytes[..]).is_err() {
                return None;
            }
            batch.next = 0;
        }
        let mut bytes = [0; 16];
        bytes.copy_from_slice(&batch.bytes[batch.next..batch.next + 16]);
        batch.next += 16;
        Some(bytes)
    });
    match bytes {
        Some(bytes) => uuid::Builder::from_random_bytes(bytes).into_uuid(),
        // The kernel gave nothing: uuid's own call says why (it panics as it always did).
        None => uuid::Uuid::new_v4(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ids_are_version_4_and_distinct_across_batches() {
        let ids: Vec<uuid::Uuid> = (0..3 * BATCH / 16 + 5).map(|_| uuid_v4()).collect();
        assert!(ids
            .iter()
            .all(|id| id.get_version_num() == 4 && id.get_variant() == uuid::Variant::RFC4122));
        let distinct: HashSet<_> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
        // Threads draw from batches of their own.
        let other = std::thread::spawn(uuid_v4).join().expect("thread");
        assert!(!distinct.contains(&other));
    }
}
