package spo

// #include <stdint.h>
// #include "spo_runtime.h"
// spo_error *goSpoSetProgress(const spo_job *job, uintptr_t handle);
import "C"

import (
	"context"
	"runtime"
	"runtime/cgo"
	"unsafe"
)

// Job is one generation. Step, Run, Preview and TakeImages must not overlap
// on one job (the library answers CodeBusy); Cancel is safe from anywhere.
type Job struct {
	h        *handle
	progress progressSlot
}

// Status is where a job stands after Step.
type Status struct {
	Done, Total uint32
	Finished    bool
}

// SetProgress sets (nil: removes) the function called after each denoising
// step, on the goroutine running Step or Run.
func (j *Job) SetProgress(fn ProgressFunc) error {
	jp, err := j.h.acquire()
	if err != nil {
		return err
	}
	defer j.h.release()
	return j.progress.set(fn, func(h cgo.Handle) error {
		return takeError(C.goSpoSetProgress((*C.spo_job)(jp), C.uintptr_t(h)))
	})
}

// Step advances one denoising step (the first also encodes the prompt, the
// last also decodes), so a caller can spread a job over frames or ticks.
func (j *Job) Step() (Status, error) {
	jp, err := j.h.acquire()
	if err != nil {
		return Status{}, err
	}
	defer j.h.release()
	var s C.spo_job_status
	err = takeError(C.spo_job_step((*C.spo_job)(jp), &s))
	j.progress.repanic()
	if err != nil {
		return Status{}, err
	}
	return Status{Done: uint32(s.done), Total: uint32(s.total), Finished: s.finished != 0}, nil
}

// Run runs the job to the end. When ctx is done first, a watching goroutine
// cancels the job and Run returns an *Error with CodeCancelled that wraps
// ctx.Err().
func (j *Job) Run(ctx context.Context) error {
	jp, err := j.h.acquire()
	if err != nil {
		return err
	}
	defer j.h.release()
	if err := ctx.Err(); err != nil {
		return &Error{code: CodeCancelled, msg: "the context was done before the job ran", cause: err}
	}
	stop := watchContext(ctx, func() { C.spo_job_cancel((*C.spo_job)(jp)) })
	err = takeError(C.spo_job_run((*C.spo_job)(jp)))
	stop() // the watcher never touches the job after Run returns
	j.progress.repanic()
	if e, ok := err.(*Error); ok && e.code == CodeCancelled && ctx.Err() != nil {
		e.cause = ctx.Err()
	}
	return err
}

// Cancel asks a running (or stepping) job to stop; it then fails with
// CodeCancelled and the pipeline is free for a new job. Safe from any
// goroutine; a no-op on a closed job.
func (j *Job) Cancel() {
	if jp, err := j.h.acquire(); err == nil {
		C.spo_job_cancel((*C.spo_job)(jp))
		j.h.release()
	}
}

// Close cancels the job if it runs, waits for the calls in flight and frees
// it, which frees the pipeline for the next job. It always returns nil.
func (j *Job) Close() error {
	j.h.close(
		func(p unsafe.Pointer) { C.spo_job_cancel((*C.spo_job)(p)) },
		func(p unsafe.Pointer) { C.spo_job_free((*C.spo_job)(p)) })
	j.progress.clear()
	runtime.SetFinalizer(j, nil)
	return nil
}

// Preview is the predicted x0 of the latest finished step, in latent space.
type Preview struct {
	Shape   [4]int // NCHW: images, channels, height, width
	Step    uint32 // steps done when it was taken
	Latents []float32
}

// Preview copies the x0 latents of the latest step; also callable from the
// progress function. Before the first step it is an error (CodeInvalidArgument).
func (j *Job) Preview() (Preview, error) {
	jp, err := j.h.acquire()
	if err != nil {
		return Preview{}, err
	}
	defer j.h.release()
	var shape [4]C.size_t
	var step C.uint32_t
	if err := takeError(C.spo_job_preview((*C.spo_job)(jp), nil, 0, &shape[0], &step)); err != nil {
		return Preview{}, err
	}
	n := int(shape[0] * shape[1] * shape[2] * shape[3])
	p := Preview{Latents: make([]float32, n)}
	var data *C.float
	if n > 0 {
		data = (*C.float)(unsafe.Pointer(&p.Latents[0]))
	}
	err = takeError(C.spo_job_preview((*C.spo_job)(jp), data, C.size_t(n), &shape[0], &step))
	if err != nil {
		return Preview{}, err
	}
	for i := range shape {
		p.Shape[i] = int(shape[i])
	}
	p.Step = uint32(step)
	return p, nil
}

// TakeImages copies out the images of a finished job (once).
func (j *Job) TakeImages() ([]Image, error) {
	jp, err := j.h.acquire()
	if err != nil {
		return nil, err
	}
	defer j.h.release()
	var images *C.spo_images
	if err := takeError(C.spo_job_take_images((*C.spo_job)(jp), &images)); err != nil {
		return nil, err
	}
	defer C.spo_images_free(images)
	out := make([]Image, int(C.spo_images_count(images)))
	for i := range out {
		var v C.spo_image
		if err := takeError(C.spo_images_get(images, C.size_t(i), &v)); err != nil {
			return nil, err
		}
		out[i] = copyImage(&v)
	}
	return out, nil
}
