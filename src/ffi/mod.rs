//! The C ABI. Argument checks and conversions only: every body runs through
//! `boundary::call`, and all behaviour lives in the Rust API.
#![allow(non_camel_case_types)]
// Exports take raw pointers by design; their validity is the header's contract
// (NULL is checked), and `unsafe` on an extern fn means nothing to a C caller.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

mod boundary;
pub mod error;
pub mod job;
pub mod lora;
pub mod options;
pub mod pipeline;
pub mod runtime;
pub mod trainer;

use std::ffi::c_char;

pub use boundary::spo_error;

/// The ABI version of this header. Pass it to `spo_runtime_create`.
pub const SPO_ABI_VERSION: u32 = 1;

/// The library version ("MAJOR.MINOR.PATCH"), a static string never freed.
///
/// Ownership: the string is static; never free it.
/// Threading: any thread.
/// Errors: none.
#[no_mangle]
pub extern "C" fn spo_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The ABI version the library implements; compare with `SPO_ABI_VERSION`.
///
/// Ownership: nothing to free.
/// Threading: any thread.
/// Errors: none.
#[no_mangle]
pub extern "C" fn spo_abi_version() -> u32 {
    crate::runtime::ABI_VERSION
}

/// Frees a string returned by the library. NULL is a no-op.
///
/// Ownership: takes `s`, which must come from a `spo_*` call that says so; it must not
/// be used afterwards.
/// Threading: any thread, once per string.
/// Errors: none (NULL is a no-op).
#[no_mangle]
pub extern "C" fn spo_string_free(s: *mut c_char) {
    boundary::call_or((), || {
        if !s.is_null() {
            // SAFETY: allocated by `CString::into_raw` in this library.
            drop(unsafe { std::ffi::CString::from_raw(s) });
        }
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn header_abi_constant_matches_runtime() {
        assert_eq!(super::SPO_ABI_VERSION, crate::runtime::ABI_VERSION);
    }
}
