package spo

// #include <stdlib.h>
// #include <stdint.h>
// #include "spo_runtime.h"
// spo_error *goSpoSetTrainerProgress(const spo_trainer *trainer, uintptr_t handle);
import "C"

import (
	"context"
	"fmt"
	"runtime"
	"runtime/cgo"
	"time"
	"unsafe"
)

// Trainer trains a LoRA on a pipeline's UNet with SPO. Its calls must not
// overlap (the library answers CodeBusy); Cancel is safe from anywhere. It
// keeps its pipeline alive after the pipeline's Close.
type Trainer struct {
	h        *handle
	progress progressSlot
}

// Metrics is what one round did (spo_train_metrics).
type Metrics struct {
	Round          uint64  // rounds completed before this one
	Loss           float64 // mean loss over the trained pairs (NaN when none)
	Pairs, Pools   uint32
	AcceptedRatio  float64 // pools whose score gap passed the threshold
	ScoreMean      float64 // mean preference score of all candidates
	ScoreGap       float64 // mean best-minus-worst score of a pool
	GradNorm       float64 // mean global gradient norm before clipping
	ClampFraction  float64 // branches whose probability ratio left the clamp
	Updates        uint32  // optimizer steps applied
	SkippedUpdates uint32  // optimizer steps skipped for a non-finite loss or gradient

	Sampling, Scoring, Forward, Backward, Optimizer, Total time.Duration
}

// NewTrainer creates a trainer from trainer keys: "train.dir" (required),
// "train.preference", "train.preset" and the settings over it listed in
// include/spo_runtime.h.
func (p *Pipeline) NewTrainer(opts Options) (*Trainer, error) {
	pp, err := p.h.acquire()
	if err != nil {
		return nil, err
	}
	defer p.h.release()
	var tr *C.spo_trainer
	err = withOptions(opts, func(o *C.spo_options) error {
		return takeError(C.spo_trainer_create((*C.spo_pipeline)(pp), o, &tr))
	})
	if err != nil {
		return nil, err
	}
	t := &Trainer{h: newHandle("trainer", unsafe.Pointer(tr))}
	runtime.SetFinalizer(t, (*Trainer).Close)
	return t, nil
}

// SetProgress sets (nil: removes) the function called during a round with
// the sampled steps, then the trained pairs, on the goroutine running Step.
func (t *Trainer) SetProgress(fn ProgressFunc) error {
	tp, err := t.h.acquire()
	if err != nil {
		return err
	}
	defer t.h.release()
	return t.progress.set(fn, func(h cgo.Handle) error {
		return takeError(C.goSpoSetTrainerProgress((*C.spo_trainer)(tp), C.uintptr_t(h)))
	})
}

// Step runs one round on the prompts: samples them with the current LoRA,
// scores the candidates, trains on the kept pairs. When ctx is done first
// the round is cancelled and Step returns an *Error with CodeCancelled that
// wraps ctx.Err(). On any error the trainer is as it was before.
func (t *Trainer) Step(ctx context.Context, prompts ...string) (Metrics, error) {
	tp, err := t.h.acquire()
	if err != nil {
		return Metrics{}, err
	}
	defer t.h.release()
	if err := ctx.Err(); err != nil {
		return Metrics{}, &Error{code: CodeCancelled, msg: "the context was done before the round ran", cause: err}
	}
	cp, err := cStrings("prompt", prompts)
	if err != nil {
		return Metrics{}, err
	}
	defer freeStrings(cp)
	var first **C.char
	if len(cp) > 0 {
		first = &cp[0]
	}
	var m C.spo_train_metrics
	stop := watchContext(ctx, func() { C.spo_trainer_cancel((*C.spo_trainer)(tp)) })
	err = takeError(C.spo_trainer_step((*C.spo_trainer)(tp), first, C.size_t(len(cp)), &m))
	stop()
	t.progress.repanic()
	if e, ok := err.(*Error); ok && e.code == CodeCancelled && ctx.Err() != nil {
		e.cause = ctx.Err()
	}
	if err != nil {
		return Metrics{}, err
	}
	return goMetrics(&m), nil
}

// Pair is one (win, lose) pair from the host's own sampler (spo_train_pair):
// the transitions x_t -> x_prev of each branch at Timestep (one of the
// trainer's DDIM schedule), conditioned on prompts[Prompt] of the Update
// call. Each latent holds LatentShape's product of floats (NCHW, batch 1); a
// pool's shared x_t may be the same slice in both branches.
type Pair struct {
	Prompt            uint32
	Timestep          int64
	XtWin, XPrevWin   []float32
	XtLose, XPrevLose []float32
}

// LatentShape is the shape of one latent of Update's pairs: [1, C, h, w].
func (t *Trainer) LatentShape() ([4]uint32, error) {
	var shape [4]uint32
	tp, err := t.h.acquire()
	if err != nil {
		return shape, err
	}
	defer t.h.release()
	var c [4]C.uint32_t
	if err := takeError(C.spo_trainer_latent_shape((*C.spo_trainer)(tp), &c[0])); err != nil {
		return shape, err
	}
	for i, v := range c {
		shape[i] = uint32(v)
	}
	return shape, nil
}

// Update trains on pairs from the host's own sampler: the mini-batches,
// gradient accumulation, clipping and AdamW of a round, without sampling.
// A latent of the wrong length is an error naming the pair and the field;
// on any error nothing changes.
func (t *Trainer) Update(prompts []string, pairs []Pair) (Metrics, error) {
	shape, err := t.LatentShape()
	if err != nil {
		return Metrics{}, err
	}
	n := int(shape[0] * shape[1] * shape[2] * shape[3])
	// The latents are copied to C memory: cgo forbids Go pointers stored in
	// the C array of pairs.
	latents, err := cLatents(pairs, n)
	if err != nil {
		return Metrics{}, err
	}
	defer C.free(latents)
	cp, err := cStrings("prompt", prompts)
	if err != nil {
		return Metrics{}, err
	}
	defer freeStrings(cp)
	tp, err := t.h.acquire()
	if err != nil {
		return Metrics{}, err
	}
	defer t.h.release()
	cpairs := make([]C.spo_train_pair, len(pairs))
	floats := unsafe.Slice((*C.float)(latents), 4*n*len(pairs))
	for i, p := range pairs {
		at := func(k int) *C.float { return &floats[(4*i+k)*n] }
		cpairs[i] = C.spo_train_pair{prompt: C.uint32_t(p.Prompt), timestep: C.int64_t(p.Timestep),
			x_t_win: at(0), x_prev_win: at(1), x_t_lose: at(2), x_prev_lose: at(3)}
	}
	var firstPrompt **C.char
	if len(cp) > 0 {
		firstPrompt = &cp[0]
	}
	var firstPair *C.spo_train_pair
	if len(cpairs) > 0 {
		firstPair = &cpairs[0]
	}
	var m C.spo_train_metrics
	err = takeError(C.spo_trainer_update((*C.spo_trainer)(tp), firstPrompt, C.size_t(len(cp)),
		firstPair, C.size_t(len(cpairs)), &m))
	if err != nil {
		return Metrics{}, err
	}
	return goMetrics(&m), nil
}

// cLatents copies the pairs' latents, each checked to hold n floats, into
// one C buffer: pair i's four latents at (4i+k)*n, in Pair's field order.
func cLatents(pairs []Pair, n int) (unsafe.Pointer, error) {
	for i, p := range pairs {
		for k, x := range [][]float32{p.XtWin, p.XPrevWin, p.XtLose, p.XPrevLose} {
			if len(x) != n {
				return nil, &Error{code: CodeInvalidArgument, msg: fmt.Sprintf(
					"pair %d: %s has %d floats, expected %d (LatentShape)", i, pairFields[k], len(x), n)}
			}
		}
	}
	buf := C.malloc(C.size_t(4*n*len(pairs))*C.size_t(unsafe.Sizeof(C.float(0))) + 1)
	if buf == nil {
		return nil, &Error{code: CodeOutOfMemory, msg: fmt.Sprintf("cannot allocate the latents of %d pairs", len(pairs))}
	}
	floats := unsafe.Slice((*float32)(buf), 4*n*len(pairs))
	for i, p := range pairs {
		for k, x := range [][]float32{p.XtWin, p.XPrevWin, p.XtLose, p.XPrevLose} {
			copy(floats[(4*i+k)*n:], x)
		}
	}
	return buf, nil
}

var pairFields = [4]string{"XtWin", "XPrevWin", "XtLose", "XPrevLose"}

// Cancel asks a running round to stop; Step then returns CodeCancelled and
// the trainer is as before the round. Safe from any goroutine; a no-op on a
// closed trainer.
func (t *Trainer) Cancel() {
	if tp, err := t.h.acquire(); err == nil {
		C.spo_trainer_cancel((*C.spo_trainer)(tp))
		t.h.release()
	}
}

// SaveLora writes the current LoRA atomically: format "webui" (kohya names,
// what A1111 and ComfyUI load) or "diffusers"; "" means "webui".
func (t *Trainer) SaveLora(path, format string) error {
	if format == "" {
		format = "webui"
	}
	return t.withPaths(func(tp *C.spo_trainer, s []*C.char) *C.spo_error {
		return C.spo_trainer_save_lora(tp, s[0], s[1])
	}, "LoRA path", path, "LoRA format", format)
}

// SaveCheckpoint writes the LoRA, the optimizer state, the round and the
// seed atomically.
func (t *Trainer) SaveCheckpoint(path string) error {
	return t.withPaths(func(tp *C.spo_trainer, s []*C.char) *C.spo_error {
		return C.spo_trainer_save_checkpoint(tp, s[0])
	}, "checkpoint path", path)
}

// LoadCheckpoint restores a checkpoint of SaveCheckpoint; training then
// continues bit for bit as the saved run would have. On error nothing changes.
func (t *Trainer) LoadCheckpoint(path string) error {
	return t.withPaths(func(tp *C.spo_trainer, s []*C.char) *C.spo_error {
		return C.spo_trainer_load_checkpoint(tp, s[0])
	}, "checkpoint path", path)
}

// Apply puts the current LoRA on pipe from memory (no file), replacing its
// LoRAs.
func (t *Trainer) Apply(pipe *Pipeline) error {
	if pipe == nil {
		return &Error{code: CodeNullArgument, msg: "the pipeline to apply the LoRA to is nil"}
	}
	tp, err := t.h.acquire()
	if err != nil {
		return err
	}
	defer t.h.release()
	pp, err := pipe.h.acquire()
	if err != nil {
		return err
	}
	defer pipe.h.release()
	return takeError(C.spo_trainer_apply((*C.spo_trainer)(tp), (*C.spo_pipeline)(pp)))
}

// Close cancels a running round, waits for the calls in flight and frees
// the trainer. It always returns nil.
func (t *Trainer) Close() error {
	t.h.close(
		func(p unsafe.Pointer) { C.spo_trainer_cancel((*C.spo_trainer)(p)) },
		func(p unsafe.Pointer) { C.spo_trainer_free((*C.spo_trainer)(p)) })
	t.progress.clear()
	runtime.SetFinalizer(t, nil)
	return nil
}

// withPaths runs call on the guarded trainer with C copies of the strings,
// given as (what, value) pairs.
func (t *Trainer) withPaths(call func(*C.spo_trainer, []*C.char) *C.spo_error, pairs ...string) error {
	tp, err := t.h.acquire()
	if err != nil {
		return err
	}
	defer t.h.release()
	cs := make([]*C.char, 0, len(pairs)/2)
	defer func() { freeStrings(cs) }()
	for i := 0; i+1 < len(pairs); i += 2 {
		c, err := cString(pairs[i], pairs[i+1])
		if err != nil {
			return err
		}
		cs = append(cs, c)
	}
	return takeError(call((*C.spo_trainer)(tp), cs))
}

// cStrings converts a list for one call in C memory (a Go array of C
// pointers may be passed; the pointers are not Go pointers). Free with
// freeStrings.
func cStrings(what string, list []string) ([]*C.char, error) {
	out := make([]*C.char, 0, len(list))
	for i, s := range list {
		c, err := cString(fmt.Sprintf("%s %d", what, i), s)
		if err != nil {
			freeStrings(out)
			return nil, err
		}
		out = append(out, c)
	}
	return out, nil
}

func freeStrings(list []*C.char) {
	for _, c := range list {
		C.free(unsafe.Pointer(c))
	}
}

func seconds(s C.double) time.Duration { return time.Duration(float64(s) * float64(time.Second)) }

func goMetrics(m *C.spo_train_metrics) Metrics {
	return Metrics{
		Round: uint64(m.round), Loss: float64(m.loss), Pairs: uint32(m.pairs), Pools: uint32(m.pools),
		AcceptedRatio: float64(m.accepted_ratio), ScoreMean: float64(m.score_mean),
		ScoreGap: float64(m.score_gap), GradNorm: float64(m.grad_norm),
		ClampFraction: float64(m.clamp_fraction), Updates: uint32(m.updates),
		SkippedUpdates: uint32(m.skipped_updates),
		Sampling:       seconds(m.time_sampling), Scoring: seconds(m.time_scoring),
		Forward: seconds(m.time_forward), Backward: seconds(m.time_backward),
		Optimizer: seconds(m.time_optimizer), Total: seconds(m.time_total),
	}
}
