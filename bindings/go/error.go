package spo

// #include "spo_runtime.h"
import "C"

import (
	"fmt"
	"strings"
)

// Code is a stable error code of the C API (spo_code).
type Code uint32

// The codes, taken from the header so they cannot drift from it.
const (
	CodeOK                 = Code(C.SPO_OK)
	CodeInvalidArgument    = Code(C.SPO_ERR_INVALID_ARGUMENT)
	CodeNullArgument       = Code(C.SPO_ERR_NULL_ARGUMENT)
	CodeInvalidUTF8        = Code(C.SPO_ERR_INVALID_UTF8)
	CodeUnknownOption      = Code(C.SPO_ERR_UNKNOWN_OPTION)
	CodeInvalidOptionValue = Code(C.SPO_ERR_INVALID_OPTION_VALUE)
	CodeABIMismatch        = Code(C.SPO_ERR_ABI_MISMATCH)
	CodeORTLoad            = Code(C.SPO_ERR_ORT_LOAD)
	CodeORT                = Code(C.SPO_ERR_ORT)
	CodeEPUnavailable      = Code(C.SPO_ERR_EP_UNAVAILABLE)
	CodeIO                 = Code(C.SPO_ERR_IO)
	CodeInvalidModel       = Code(C.SPO_ERR_INVALID_MODEL)
	CodeInvalidLora        = Code(C.SPO_ERR_INVALID_LORA)
	CodeInvalidFile        = Code(C.SPO_ERR_INVALID_FILE)
	CodeBusy               = Code(C.SPO_ERR_BUSY)
	CodeCancelled          = Code(C.SPO_ERR_CANCELLED)
	CodeUnsupported        = Code(C.SPO_ERR_UNSUPPORTED)
	CodeOutOfMemory        = Code(C.SPO_ERR_OUT_OF_MEMORY)
	CodePanic              = Code(C.SPO_ERR_PANIC)
)

// Error is an error of the library (or of this binding's argument checks):
// the stable code and a message naming the file, key, shape or value at fault.
type Error struct {
	code  Code
	msg   string
	cause error
}

func (e *Error) Error() string { return fmt.Sprintf("spo: %s (code %d)", e.msg, e.code) }

// Code is the stable error code.
func (e *Error) Code() Code { return e.code }

// Message is the library's message alone.
func (e *Error) Message() string { return e.msg }

// Unwrap gives the context error when a context cancelled the job, so
// errors.Is(err, context.Canceled) holds then.
func (e *Error) Unwrap() error { return e.cause }

// takeError turns a returned error object into an *Error and frees it; nil
// (success) gives nil.
func takeError(e *C.spo_error) error {
	if e == nil {
		return nil
	}
	defer C.spo_error_free(e)
	return &Error{code: Code(C.spo_error_code(e)), msg: C.GoString(C.spo_error_message(e))}
}

// checkString refuses what C.CString would silently cut short.
func checkString(what, s string) error {
	if strings.IndexByte(s, 0) >= 0 {
		return &Error{code: CodeInvalidArgument, msg: fmt.Sprintf("%s %q contains a NUL byte", what, s)}
	}
	return nil
}
