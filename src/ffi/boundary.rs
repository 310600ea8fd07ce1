//! The one boundary every export goes through: panics are caught, pointers and
//! strings are checked, and a `Result` becomes an owned `spo_error*`.

use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;

use crate::error::{Error, ErrorCode, Result};

/// An error object: what every fallible call returns instead of NULL.
///
/// Ownership: the caller owns it; free it once with `spo_error_free`.
/// Threading: immutable: read it from any thread; free it from one.
/// Errors: none; it is itself the error value every fallible call returns.
pub struct spo_error {
    pub(crate) code: ErrorCode,
    pub(crate) message: CString,
}

impl spo_error {
    pub(crate) fn boxed(e: Error) -> *mut spo_error {
        // Interior NULs cannot be represented in C; keep the rest of the text.
        let message = CString::new(e.message.replace('\0', "\\0")).unwrap_or_default();
        Box::into_raw(Box::new(spo_error {
            code: e.code,
            message,
        }))
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_owned()
    }
}

/// Runs a fallible export body: `NULL` on success, an error object otherwise.
pub(crate) fn call(f: impl FnOnce() -> Result<()>) -> *mut spo_error {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => ptr::null_mut(),
        Ok(Err(e)) => spo_error::boxed(e),
        Err(p) => spo_error::boxed(Error::new(
            ErrorCode::Panic,
            format!(
                "internal error (panic caught at the C boundary): {}",
                panic_message(&*p)
            ),
        )),
    }
}

/// Runs an infallible export body (a getter or a free); a panic yields `fallback`.
pub(crate) fn call_or<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(fallback)
}

pub(crate) fn null_arg(name: &str) -> Error {
    Error::new(
        ErrorCode::NullArgument,
        format!("argument '{name}' is NULL"),
    )
}

/// Borrows a handle, refusing NULL.
pub(crate) fn arg_ref<'a, T>(p: *const T, name: &str) -> Result<&'a T> {
    // SAFETY: the header requires a pointer from this library's constructors.
    unsafe { p.as_ref() }.ok_or_else(|| null_arg(name))
}

/// Borrows a handle mutably, refusing NULL.
pub(crate) fn arg_mut<'a, T>(p: *mut T, name: &str) -> Result<&'a mut T> {
    // SAFETY: as for `arg_ref`; the header forbids concurrent use where mutable.
    unsafe { p.as_mut() }.ok_or_else(|| null_arg(name))
}

/// Borrows a NUL-terminated UTF-8 string, refusing NULL and invalid UTF-8.
pub(crate) fn arg_str<'a>(p: *const c_char, name: &str) -> Result<&'a str> {
    if p.is_null() {
        return Err(null_arg(name));
    }
    // SAFETY: non-NULL and NUL-terminated per the header contract.
    let bytes = unsafe { CStr::from_ptr(p) }.to_bytes();
    std::str::from_utf8(bytes).map_err(|e| {
        Error::new(
            ErrorCode::InvalidUtf8,
            format!(
                "argument '{name}' is not valid UTF-8 (bad byte at offset {})",
                e.valid_up_to()
            ),
        )
    })
}

/// Checks an out-parameter before any work is done, so nothing is lost when it
/// is NULL. Write through the returned slot only on success.
pub(crate) fn out_slot<'a, T>(p: *mut T, name: &str) -> Result<&'a mut T> {
    // SAFETY: non-NULL per the check; the caller owns the storage.
    unsafe { p.as_mut() }.ok_or_else(|| null_arg(name))
}

/// Hands a value to C as an owned pointer.
pub(crate) fn into_handle<T>(v: T) -> *mut T {
    Box::into_raw(Box::new(v))
}

/// Frees a handle made by `into_handle`; NULL is a no-op.
pub(crate) fn free_handle<T>(p: *mut T) {
    if !p.is_null() {
        // SAFETY: the header requires a pointer from this library, freed once.
        drop(unsafe { Box::from_raw(p) });
    }
}

/// A library-allocated C string, freed with `spo_string_free`.
pub(crate) fn owned_c_string(s: &str) -> *mut c_char {
    CString::new(s.replace('\0', "\\0"))
        .unwrap_or_default()
        .into_raw()
}

/// A host's `void* user_data`, which the header requires to be usable from any
/// thread the callback may run on.
pub(crate) struct UserData(*mut std::ffi::c_void);
// SAFETY: the header makes thread-safety of user_data the host's promise.
unsafe impl Send for UserData {}
unsafe impl Sync for UserData {}

impl UserData {
    pub(crate) fn new(p: *mut std::ffi::c_void) -> Self {
        UserData(p)
    }
    // A method (not `.0`) so closures capture the Send wrapper, not the raw field.
    pub(crate) fn get(&self) -> *mut std::ffi::c_void {
        self.0
    }
}
