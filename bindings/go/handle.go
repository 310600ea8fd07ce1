package spo

import (
	"fmt"
	"sync"
	"unsafe"
)

// handle guards one C handle: calls acquire it (counted), Close waits for
// those calls to end before freeing it, so no call ever sees a freed pointer.
// It is not an RWMutex because a progress callback may call back in (Preview)
// while its Run holds the handle and a Close waits.
type handle struct {
	kind    string
	mu      sync.Mutex
	idle    sync.Cond
	ptr     unsafe.Pointer
	users   int
	closing bool
}

func newHandle(kind string, ptr unsafe.Pointer) *handle {
	h := &handle{kind: kind, ptr: ptr}
	h.idle.L = &h.mu
	return h
}

func (h *handle) acquire() (unsafe.Pointer, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.ptr == nil || h.closing {
		return nil, &Error{code: CodeInvalidArgument, msg: fmt.Sprintf("the %s is closed", h.kind)}
	}
	h.users++
	return h.ptr, nil
}

func (h *handle) release() {
	h.mu.Lock()
	h.users--
	if h.users == 0 {
		h.idle.Broadcast()
	}
	h.mu.Unlock()
}

// close runs interrupt (if any) at once, waits for the calls in flight, then
// frees. A second close is a no-op.
func (h *handle) close(interrupt, free func(unsafe.Pointer)) {
	h.mu.Lock()
	if h.ptr == nil || h.closing {
		h.mu.Unlock()
		return
	}
	h.closing = true
	p := h.ptr
	if interrupt != nil {
		interrupt(p)
	}
	for h.users > 0 {
		h.idle.Wait()
	}
	h.ptr = nil
	h.mu.Unlock()
	free(p)
}
