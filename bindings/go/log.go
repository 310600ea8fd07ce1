package spo

// #include <stdint.h>
// #include "spo_runtime.h"
// spo_error *goSpoSetLog(const spo_runtime *runtime, uintptr_t id, int32_t max_level);
import "C"

import (
	"sync"
	"unsafe"
)

// LogLevel is a message's severity (spo_log_level), most severe first: a
// log function set at LogInfo also receives warnings and errors.
type LogLevel int32

// The levels of the C API.
const (
	LogError = LogLevel(C.SPO_LOG_ERROR)
	LogWarn  = LogLevel(C.SPO_LOG_WARN)
	LogInfo  = LogLevel(C.SPO_LOG_INFO)
	LogDebug = LogLevel(C.SPO_LOG_DEBUG)
)

// LogFunc receives one message. It may run on any goroutine or thread that
// calls into the library (also ONNX Runtime's), so it must be safe for
// concurrent use and must not block for long.
type LogFunc func(level LogLevel, message string)

// logSinks maps registration ids (the C callback's user_data) to functions.
// Ids are never reused and a missing id drops the message, because the
// library may still be delivering a message it read just before the
// function was replaced: a deleted cgo.Handle would panic there instead.
var logSinks = struct {
	sync.Mutex
	next uintptr
	fns  map[uintptr]LogFunc
}{fns: map[uintptr]LogFunc{}}

func registerLog(fn LogFunc) uintptr {
	logSinks.Lock()
	defer logSinks.Unlock()
	logSinks.next++
	logSinks.fns[logSinks.next] = fn
	return logSinks.next
}

func unregisterLog(id uintptr) {
	logSinks.Lock()
	delete(logSinks.fns, id)
	logSinks.Unlock()
}

// SetLog sets (nil: removes) the function receiving the runtime's messages
// at maxLevel and above; it replaces the previous one. The runtime's Close
// removes it, so pipelines still open log nothing more after that.
func (r *Runtime) SetLog(maxLevel LogLevel, fn LogFunc) error {
	rp, err := r.h.acquire()
	if err != nil {
		return err
	}
	defer r.h.release()
	r.logMu.Lock()
	defer r.logMu.Unlock()
	var id uintptr
	if fn != nil {
		id = registerLog(fn)
	}
	if err := takeError(C.goSpoSetLog((*C.spo_runtime)(rp), C.uintptr_t(id), C.int32_t(maxLevel))); err != nil {
		unregisterLog(id)
		return err
	}
	unregisterLog(r.logID)
	r.logID = id
	return nil
}

// dropLog removes the log function before the runtime handle is freed.
func (r *Runtime) dropLog(rp unsafe.Pointer) {
	r.logMu.Lock()
	defer r.logMu.Unlock()
	if r.logID != 0 {
		_ = takeError(C.goSpoSetLog((*C.spo_runtime)(rp), 0, C.SPO_LOG_ERROR))
		unregisterLog(r.logID)
		r.logID = 0
	}
}

//export goSpoLog
func goSpoLog(id C.uintptr_t, level C.int32_t, message *C.char) {
	logSinks.Lock()
	fn := logSinks.fns[uintptr(id)]
	logSinks.Unlock()
	if fn == nil {
		return
	}
	// A panic must not unwind through the library's C frames; there is no
	// caller to hand it to, so the message is dropped.
	defer func() { _ = recover() }()
	fn(LogLevel(level), C.GoString(message))
}
