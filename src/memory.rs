//! Fallible allocation for the large buffers (latents, batches, images,
//! merged weights, tensors read from files): a failed allocation becomes an
//! `OutOfMemory` error that names the buffer, instead of Rust's abort, which
//! would take the host process down with it.

use crate::error::{Error, ErrorCode, Result};

/// The error of a failed allocation of `count` values of `T` for `what`.
pub fn out_of_memory<T>(count: usize, what: &str) -> Error {
    let bytes = (count as u128) * (std::mem::size_of::<T>() as u128);
    Error::new(
        ErrorCode::OutOfMemory,
        format!("out of memory: {what} needs {bytes} bytes"),
    )
}

/// An empty vector with room for exactly `n` values.
pub fn with_capacity<T>(n: usize, what: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|_| out_of_memory::<T>(n, what))?;
    Ok(v)
}

/// `n` copies of `value`.
pub fn filled<T: Clone>(n: usize, value: T, what: &str) -> Result<Vec<T>> {
    let mut v = with_capacity(n, what)?;
    v.resize(n, value);
    Ok(v)
}

/// Collects `iter`, whose length is `n`, into a fallibly allocated vector.
pub fn collect<T>(n: usize, iter: impl IntoIterator<Item = T>, what: &str) -> Result<Vec<T>> {
    let mut v = with_capacity(n, what)?;
    v.extend(iter);
    Ok(v)
}

/// Maps an ONNX Runtime error message that reports a failed allocation
/// (`std::bad_alloc`, the arena's "Failed to allocate memory", CUDA's "out of
/// memory") to `OutOfMemory`; `None` for any other message.
pub fn ort_out_of_memory(message: &str) -> Option<Error> {
    const SIGNS: &[&str] = &[
        "bad_alloc",
        "Failed to allocate",
        "failed to allocate",
        "out of memory",
        "Out of memory",
        "CUDA_ERROR_OUT_OF_MEMORY",
    ];
    SIGNS.iter().any(|s| message.contains(s)).then(|| {
        Error::new(
            ErrorCode::OutOfMemory,
            format!("out of memory in ONNX Runtime: {message}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_impossible_allocation_is_an_error_not_an_abort() {
        // More than isize::MAX bytes: refused before the allocator is asked.
        let e = with_capacity::<f32>(usize::MAX / 2, "latents").unwrap_err();
        assert_eq!(e.code, ErrorCode::OutOfMemory);
        assert!(e.message.contains("latents"), "{}", e.message);
        // 2^62 bytes: a valid layout, but beyond any address space, so the
        // allocator itself fails (whatever the overcommit policy).
        let e = filled(1usize << 60, 0f32, "noise").unwrap_err();
        assert_eq!(e.code, ErrorCode::OutOfMemory);
        assert!(
            e.message.contains(&format!("{} bytes", 1u64 << 62)),
            "{}",
            e.message
        );
        assert_eq!(filled(3, 1u8, "x").unwrap(), vec![1, 1, 1]);
        assert_eq!(collect(2, [4, 5], "x").unwrap(), vec![4, 5]);
    }

    #[test]
    fn ort_allocation_failures_are_recognised() {
        for m in [
            "std::bad_alloc",
            "Failed to allocate memory for requested buffer of size 1099511627776",
            "CUDA failure 2: out of memory",
        ] {
            assert_eq!(ort_out_of_memory(m).unwrap().code, ErrorCode::OutOfMemory);
        }
        assert!(ort_out_of_memory("Invalid input name: x").is_none());
    }
}
