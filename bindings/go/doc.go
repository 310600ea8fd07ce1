// Package spo binds the spo-runtime C API (include/spo_runtime.h) for Go.
//
// Every handle (Runtime, Pipeline, Lora, Job, Trainer) has an explicit Close; a
// finalizer frees a forgotten one, but only Close frees it at a known time.
// Close waits for calls in flight on the handle (a Job's Close cancels its
// run first), and a handle used after Close returns an error, not a crash.
// The C API's threading rules hold unchanged: a Runtime and a Lora may be
// shared by any number of goroutines, a Pipeline runs one job at a time
// (a second one gets CodeBusy), and Job.Cancel and Trainer.Cancel may be
// called from anywhere.
//
// Errors from the library are *Error values carrying the stable code and
// the library's message (use errors.As and Code()).
//
// The package links against libspo_runtime in ../../target/release (built by
// `make build`); against an installed copy, add its flags through
// CGO_CFLAGS and CGO_LDFLAGS.
package spo

// #cgo CFLAGS: -I${SRCDIR}/../../include
// #cgo LDFLAGS: -L${SRCDIR}/../../target/release -Wl,-rpath,${SRCDIR}/../../target/release -lspo_runtime
// #include "spo_runtime.h"
import "C"

// Version is the library's version, "MAJOR.MINOR.PATCH".
func Version() string { return C.GoString(C.spo_version()) }

// ABIVersion is the ABI version of the loaded library; NewRuntime refuses a
// library whose ABI differs from the header this package was built with
// (HeaderABIVersion).
func ABIVersion() uint32 { return uint32(C.spo_abi_version()) }

// HeaderABIVersion is the ABI version of the header this package was built with.
const HeaderABIVersion = uint32(C.SPO_ABI_VERSION)
