package spo

// #include <stdlib.h>
// #include <stdint.h>
// #include "spo_runtime.h"
// spo_error *goSpoSetOptionsLog(spo_options *options, uintptr_t id, int32_t max_level);
import "C"

import (
	"runtime"
	"sync"
	"unsafe"
)

// Runtime is a loaded ONNX Runtime with its execution providers. Share it
// between goroutines; pipelines keep what they need of it after its Close.
type Runtime struct {
	h     *handle
	logMu sync.Mutex // guards logID
	logID uintptr    // the registration of SetLog's function, 0 for none
}

// NewRuntime creates a runtime (runtime keys such as "ep", "threads.intra",
// "limits.*"; nil for the defaults).
func NewRuntime(opts Options) (*Runtime, error) {
	var rt *C.spo_runtime
	err := withOptions(opts, func(o *C.spo_options) error {
		return takeError(C.spo_runtime_create(C.SPO_ABI_VERSION, o, &rt))
	})
	if err != nil {
		return nil, err
	}
	r := &Runtime{h: newHandle("runtime", unsafe.Pointer(rt))}
	runtime.SetFinalizer(r, (*Runtime).Close)
	return r, nil
}

// NewRuntimeWithLog creates a runtime whose log function (as SetLog's) is
// set before creation, so it also receives the messages of creation itself,
// such as the line saying which execution providers run. Close removes it.
func NewRuntimeWithLog(opts Options, maxLevel LogLevel, fn LogFunc) (*Runtime, error) {
	if fn == nil {
		return NewRuntime(opts)
	}
	o, err := opts.cOptions()
	if err != nil {
		return nil, err
	}
	defer C.spo_options_free(o)
	id := registerLog(fn)
	var rt *C.spo_runtime
	err = takeError(C.goSpoSetOptionsLog(o, C.uintptr_t(id), C.int32_t(maxLevel)))
	if err == nil {
		err = takeError(C.spo_runtime_create(C.SPO_ABI_VERSION, o, &rt))
	}
	if err != nil {
		unregisterLog(id)
		return nil, err
	}
	r := &Runtime{h: newHandle("runtime", unsafe.Pointer(rt)), logID: id}
	runtime.SetFinalizer(r, (*Runtime).Close)
	return r, nil
}

// Info answers "version", "ort.version", "ep.active" and the other keys of
// spo_runtime_info.
func (r *Runtime) Info(key string) (string, error) {
	return askInfo(r.h, key, func(p unsafe.Pointer, k *C.char, out **C.char) *C.spo_error {
		return C.spo_runtime_info((*C.spo_runtime)(p), k, out)
	})
}

// Close removes the log function and frees the runtime handle. It always
// returns nil.
func (r *Runtime) Close() error {
	r.h.close(nil, func(p unsafe.Pointer) {
		r.dropLog(p)
		C.spo_runtime_free((*C.spo_runtime)(p))
	})
	runtime.SetFinalizer(r, nil)
	return nil
}

// askInfo runs one of the spo_*_info calls on a guarded handle.
func askInfo(h *handle, key string, call func(unsafe.Pointer, *C.char, **C.char) *C.spo_error) (string, error) {
	p, err := h.acquire()
	if err != nil {
		return "", err
	}
	defer h.release()
	ck, err := cString("info key", key)
	if err != nil {
		return "", err
	}
	defer C.free(unsafe.Pointer(ck))
	var out *C.char
	if err := takeError(call(p, ck, &out)); err != nil {
		return "", err
	}
	return takeString(out), nil
}
