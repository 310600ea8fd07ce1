package spo

// #include <stdint.h>
import "C"

import (
	"fmt"
	"runtime/cgo"
	"sync"
)

// ProgressFunc is called with the work done and the total (denoising steps
// of a job; sampled steps, then trained pairs, of a training round);
// returning false cancels the job or round.
type ProgressFunc func(done, total uint32) bool

// progressState is what the C callback's user_data (a cgo.Handle) names.
type progressState struct {
	fn       ProgressFunc
	handle   cgo.Handle
	mu       sync.Mutex
	panicked interface{}
}

func (s *progressState) takePanic() interface{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	v := s.panicked
	s.panicked = nil
	return v
}

// call runs the user's function; a panic cancels the job and is kept for
// repanic instead of unwinding through the library's C frames.
func (s *progressState) call(done, total uint32) (cont bool) {
	defer func() {
		if v := recover(); v != nil {
			s.mu.Lock()
			s.panicked = fmt.Sprintf("spo: progress function panicked: %v", v)
			s.mu.Unlock()
			cont = false
		}
	}()
	return s.fn(done, total)
}

// progressSlot is the progress function registered on one job or trainer.
// Its cgo.Handle is deleted only once the library can no longer call it:
// after a replacement is installed, or after the object is freed.
type progressSlot struct {
	mu    sync.Mutex
	state *progressState
}

// set installs fn (nil: none) through install, which passes the handle (0
// for none) to the library's set_progress_callback.
func (s *progressSlot) set(fn ProgressFunc, install func(h cgo.Handle) error) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	var state *progressState
	var h cgo.Handle
	if fn != nil {
		state = &progressState{fn: fn}
		h = cgo.NewHandle(state)
	}
	if err := install(h); err != nil {
		if h != 0 {
			h.Delete()
		}
		return err
	}
	if s.state != nil {
		s.state.handle.Delete()
	}
	if state != nil {
		state.handle = h
	}
	s.state = state
	return nil
}

// clear deletes the handle; call it only after the native object is freed.
func (s *progressSlot) clear() {
	s.mu.Lock()
	if s.state != nil {
		s.state.handle.Delete()
		s.state = nil
	}
	s.mu.Unlock()
}

// repanic re-raises, on the caller's goroutine, a panic of the progress
// function that the callback caught so it would not unwind through C.
func (s *progressSlot) repanic() {
	s.mu.Lock()
	state := s.state
	s.mu.Unlock()
	if state == nil {
		return
	}
	if v := state.takePanic(); v != nil {
		panic(v)
	}
}

//export goSpoProgress
func goSpoProgress(h C.uintptr_t, done, total C.uint32_t) C.int32_t {
	state := cgo.Handle(h).Value().(*progressState)
	if state.call(uint32(done), uint32(total)) {
		return 0
	}
	return 1
}
