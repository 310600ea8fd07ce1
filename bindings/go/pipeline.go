package spo

// #include <stdlib.h>
// #include "spo_runtime.h"
import "C"

import (
	"context"
	"fmt"
	"runtime"
	"unsafe"
)

// Pipeline is a loaded SDXL or SD 1.5 model folder. Goroutines may share it,
// but it runs one job at a time: creating a second gets CodeBusy.
type Pipeline struct{ h *handle }

// LoadPipeline loads a diffusers/optimum ONNX folder (pipeline keys such as
// "vae.upcast", "lora.allow_partial"; nil for the defaults).
func (r *Runtime) LoadPipeline(dir string, opts Options) (*Pipeline, error) {
	rp, err := r.h.acquire()
	if err != nil {
		return nil, err
	}
	defer r.h.release()
	cd, err := cString("model folder", dir)
	if err != nil {
		return nil, err
	}
	defer C.free(unsafe.Pointer(cd))
	var pipe *C.spo_pipeline
	err = withOptions(opts, func(o *C.spo_options) error {
		return takeError(C.spo_pipeline_load((*C.spo_runtime)(rp), cd, o, &pipe))
	})
	if err != nil {
		return nil, err
	}
	p := &Pipeline{h: newHandle("pipeline", unsafe.Pointer(pipe))}
	runtime.SetFinalizer(p, (*Pipeline).Close)
	return p, nil
}

// Info answers "kind", "default_size", "ep.unet" and the other keys of
// spo_pipeline_info.
func (p *Pipeline) Info(key string) (string, error) {
	return askInfo(p.h, key, func(ptr unsafe.Pointer, k *C.char, out **C.char) *C.spo_error {
		return C.spo_pipeline_info((*C.spo_pipeline)(ptr), k, out)
	})
}

// SetLoras replaces the pipeline's LoRAs (none removes them all). On error
// the pipeline keeps its previous LoRAs.
func (p *Pipeline) SetLoras(mode LoraMode, loras ...WeightedLora) error {
	pp, err := p.h.acquire()
	if err != nil {
		return err
	}
	defer p.h.release()
	handles := make([]*C.spo_lora, len(loras))
	mults := make([]C.float, len(loras))
	for i, l := range loras {
		if l.Lora == nil {
			return &Error{code: CodeNullArgument, msg: fmt.Sprintf("LoRA %d of %d is nil", i, len(loras))}
		}
		lp, err := l.Lora.h.acquire()
		if err != nil {
			return err
		}
		defer l.Lora.h.release()
		handles[i], mults[i] = (*C.spo_lora)(lp), C.float(l.Multiplier)
	}
	var hp **C.spo_lora
	var mp *C.float
	if len(loras) > 0 {
		hp, mp = &handles[0], &mults[0]
	}
	return takeError(C.spo_pipeline_set_loras((*C.spo_pipeline)(pp), hp, mp, C.size_t(len(loras)), C.int32_t(mode)))
}

// NewJob creates a job from job keys ("prompt", "steps", "seed", "width",
// ...). Close it (or let it finish) before the next job of this pipeline.
func (p *Pipeline) NewJob(opts Options) (*Job, error) {
	pp, err := p.h.acquire()
	if err != nil {
		return nil, err
	}
	defer p.h.release()
	var job *C.spo_job
	err = withOptions(opts, func(o *C.spo_options) error {
		return takeError(C.spo_job_create((*C.spo_pipeline)(pp), o, &job))
	})
	if err != nil {
		return nil, err
	}
	j := &Job{h: newHandle("job", unsafe.Pointer(job))}
	runtime.SetFinalizer(j, (*Job).Close)
	return j, nil
}

// Generate runs a whole job: create, run (cancelled when ctx is done), take
// the images, close. progress may be nil.
func (p *Pipeline) Generate(ctx context.Context, opts Options, progress ProgressFunc) ([]Image, error) {
	job, err := p.NewJob(opts)
	if err != nil {
		return nil, err
	}
	defer job.Close()
	if progress != nil {
		if err := job.SetProgress(progress); err != nil {
			return nil, err
		}
	}
	if err := job.Run(ctx); err != nil {
		return nil, err
	}
	return job.TakeImages()
}

// Close frees the pipeline handle; jobs still open keep its sessions alive.
// It always returns nil.
func (p *Pipeline) Close() error {
	p.h.close(nil, func(ptr unsafe.Pointer) { C.spo_pipeline_free((*C.spo_pipeline)(ptr)) })
	runtime.SetFinalizer(p, nil)
	return nil
}
