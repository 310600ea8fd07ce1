package spo

// #include <stdint.h>
import "C"

import (
	"fmt"
	"runtime/cgo"
	"sync"
)

// ProgressFunc is called after each denoising step with the steps done and
// the total; returning false cancels the job.
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

//export goSpoProgress
func goSpoProgress(h C.uintptr_t, done, total C.uint32_t) C.int32_t {
	state := cgo.Handle(h).Value().(*progressState)
	if state.call(uint32(done), uint32(total)) {
		return 0
	}
	return 1
}
