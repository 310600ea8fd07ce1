//! Fallible allocation for the large buffers (latents, batches, images,
//! merged weights, tensors read from files): a failed allocation becomes an
//! `OutOfMemory` error that names the buffer, instead of Rust's abort, which
//! would take the host process down with it.

use ndarray::{Array, Array2, ArrayD, ArrayView, ArrayView2, ArrayViewD, Axis, Dimension, IxDyn};

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

/// The number of values of `shape`; a product that overflows `usize` is an
/// allocation no machine can make, so it fails as one.
pub fn count<T>(shape: &[usize], what: &str) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| {
            let n = shape
                .iter()
                .fold(1u128, |n, &d| n.saturating_mul(d as u128));
            Error::new(
                ErrorCode::OutOfMemory,
                format!(
                    "out of memory: {what} {shape:?} needs {} bytes",
                    n.saturating_mul(std::mem::size_of::<T>() as u128)
                ),
            )
        })
}

/// An array of `shape` filled with `T::default()`, zero for numbers
/// (ndarray's `zeros` aborts on failure).
pub fn zeros<T: Clone + Default, D: Dimension>(shape: D, what: &str) -> Result<Array<T, D>> {
    let n = count::<T>(shape.slice(), what)?;
    let data = filled(n, T::default(), what)?;
    Ok(Array::from_shape_vec(shape, data).expect("the length is the shape's count"))
}

/// An owned, standard-layout copy of `a` (ndarray's `to_owned` aborts on failure).
pub fn to_owned<T: Clone, D: Dimension>(a: ArrayView<'_, T, D>, what: &str) -> Result<Array<T, D>> {
    let data = collect(a.len(), a.iter().cloned(), what)?;
    Ok(Array::from_shape_vec(a.raw_dim(), data).expect("the length is the shape's count"))
}

/// `a · b` into a fallibly allocated result (ndarray's `dot` aborts on failure).
pub fn matmul(a: &ArrayView2<'_, f32>, b: &ArrayView2<'_, f32>, what: &str) -> Result<Array2<f32>> {
    if a.ncols() != b.nrows() {
        return Err(Error::invalid_argument(format!(
            "{what}: cannot multiply {:?} by {:?}",
            a.dim(),
            b.dim()
        )));
    }
    let mut c = zeros(ndarray::Ix2(a.nrows(), b.ncols()), what)?;
    ndarray::linalg::general_mat_mul(1.0, a, b, 0.0, &mut c);
    Ok(c)
}

/// Joins `parts` along `axis` (ndarray's `concatenate` aborts on failure); the
/// parts must agree on every other axis.
pub fn concat<T: Clone + Default>(
    axis: usize,
    parts: &[ArrayViewD<'_, T>],
    what: &str,
) -> Result<ArrayD<T>> {
    let first = parts
        .first()
        .ok_or_else(|| Error::invalid_argument(format!("{what}: nothing to join")))?;
    let mut shape = first.shape().to_vec();
    shape[axis] = 0;
    for p in parts {
        let same = p.ndim() == shape.len()
            && (0..shape.len()).all(|i| i == axis || p.shape()[i] == first.shape()[i]);
        if !same {
            return Err(Error::invalid_argument(format!(
                "{what}: cannot join shape {:?} to {:?} along axis {axis}",
                p.shape(),
                first.shape()
            )));
        }
        shape[axis] = shape[axis].checked_add(p.shape()[axis]).ok_or_else(|| {
            Error::new(
                ErrorCode::OutOfMemory,
                format!("out of memory: {what} is longer than any buffer can be"),
            )
        })?;
    }
    let mut out = zeros(IxDyn(&shape), what)?;
    let mut at = 0;
    for p in parts {
        let len = p.shape()[axis];
        out.slice_axis_mut(Axis(axis), (at..at + len).into())
            .assign(p);
        at += len;
    }
    Ok(out)
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
    fn array_helpers_refuse_impossible_sizes_without_allocating() {
        // A shape whose element count overflows usize.
        let e = zeros::<f32, _>(IxDyn(&[usize::MAX, 3]), "the batch").unwrap_err();
        assert_eq!(e.code, ErrorCode::OutOfMemory);
        assert!(
            e.message.contains("the batch") && e.message.contains("bytes"),
            "{}",
            e.message
        );
        // A count that fits usize but whose bytes exceed isize::MAX.
        let e = zeros::<f32, _>(ndarray::Ix2(1 << 31, 1 << 31), "the LoRA delta").unwrap_err();
        assert_eq!(e.code, ErrorCode::OutOfMemory);
        assert!(
            e.message.contains(&format!("{} bytes", 1u128 << 64)),
            "{}",
            e.message
        );
        // Joining two broadcast views (no memory behind them) of 2^29 x 2^29
        // values: 2^61 bytes, beyond any address space, so the allocator
        // refuses before anything is copied.
        let one = ArrayD::<f32>::zeros(IxDyn(&[1, 1]));
        let huge = one.broadcast(IxDyn(&[1 << 29, 1 << 29])).unwrap();
        let e = concat(0, &[huge.clone(), huge.clone()], "a batch of tensors").unwrap_err();
        assert_eq!(e.code, ErrorCode::OutOfMemory);
        assert!(e.message.contains("a batch of tensors"), "{}", e.message);
        // Lengths whose sum overflows usize (zero-sized parts hold no data).
        let empty = ArrayD::<f32>::zeros(IxDyn(&[1 << 62, 0]));
        let parts = vec![empty.view(); 4];
        let e = concat(0, &parts, "the candidates").unwrap_err();
        assert_eq!(e.code, ErrorCode::OutOfMemory, "{}", e.message);
    }

    #[test]
    fn concat_matches_ndarray_and_names_mismatches() {
        let a = ndarray::Array::from_shape_fn(IxDyn(&[2, 3]), |d| (d[0] * 10 + d[1]) as f32);
        let b = ndarray::Array::from_shape_fn(IxDyn(&[1, 3]), |d| 100.0 + d[1] as f32);
        let mine = concat(0, &[a.view(), b.view()], "rows").unwrap();
        let theirs = ndarray::concatenate(Axis(0), &[a.view(), b.view()]).unwrap();
        assert_eq!(mine, theirs);
        let t = a.t().into_dyn();
        let c = ndarray::Array::from_shape_fn(IxDyn(&[3, 1]), |d| -(d[0] as f32));
        let mine = concat(1, &[t.view(), c.view()], "cols").unwrap();
        assert_eq!(
            mine,
            ndarray::concatenate(Axis(1), &[t.view(), c.view()]).unwrap()
        );
        let e = concat(0, &[a.view(), c.view()], "the LoRA slot inputs").unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument);
        assert!(
            e.message.contains("the LoRA slot inputs") && e.message.contains("[3, 1]"),
            "{}",
            e.message
        );
    }

    #[test]
    fn matmul_and_to_owned_agree_with_hand_results() {
        let a = ndarray::arr2(&[[1.0f32, 2.0], [3.0, 4.0], [5.0, 6.0]]);
        let b = ndarray::arr2(&[[1.0f32, 0.0, -1.0], [2.0, 1.0, 0.5]]);
        // Worked by hand: row i of a times column j of b.
        let want = ndarray::arr2(&[[5.0f32, 2.0, 0.0], [11.0, 4.0, -1.0], [17.0, 6.0, -2.0]]);
        assert_eq!(matmul(&a.view(), &b.view(), "p").unwrap(), want);
        assert_eq!(
            matmul(&a.view(), &a.view(), "p").unwrap_err().code,
            ErrorCode::InvalidArgument
        );
        let t = to_owned(a.t(), "copy").unwrap();
        assert_eq!(t, ndarray::arr2(&[[1.0f32, 3.0, 5.0], [2.0, 4.0, 6.0]]));
        assert!(t.is_standard_layout());
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
