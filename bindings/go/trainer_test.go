package spo_test

// The trainer and the log function on the tiny SD 1.5 fixture with the toy
// colour preference model, at the settings of tests/c/trainer.c (3 DDIM
// steps, pools of 2) so a round takes seconds.

import (
	"context"
	"errors"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"spo-runtime/spo"
)

var (
	sd15Model = root + "/tests/fixtures/tiny-sd15"
	trainDir  = root + "/tests/fixtures/train/tiny-sd15/graphs"
)

func trainerOptions(dir string) spo.Options {
	return spo.Options{
		"train.dir": dir, "train.preference": root + "/tests/fixtures/preference/colour",
		"train.preset": "toy", "train.steps": "3", "train.divert_start": "1", "train.pool": "2",
		"train.threshold": "0",
	}
}

func setupSD15(t *testing.T) (*spo.Runtime, *spo.Pipeline) {
	t.Helper()
	rt, err := spo.NewRuntime(spo.Options{"ep": "cpu"})
	if err != nil {
		t.Fatal(err)
	}
	pipe, err := rt.LoadPipeline(sd15Model, nil)
	if err != nil {
		rt.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { pipe.Close(); rt.Close() })
	return rt, pipe
}

func newTrainer(t *testing.T, pipe *spo.Pipeline) *spo.Trainer {
	t.Helper()
	tr, err := pipe.NewTrainer(trainerOptions(trainDir))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tr.Close() })
	return tr
}

func checkFinite(t *testing.T, m spo.Metrics) {
	t.Helper()
	for name, v := range map[string]float64{"loss": m.Loss, "score_mean": m.ScoreMean,
		"score_gap": m.ScoreGap, "grad_norm": m.GradNorm, "accepted_ratio": m.AcceptedRatio} {
		if math.IsNaN(v) || math.IsInf(v, 0) {
			t.Errorf("metric %s = %v, want finite", name, v)
		}
	}
}

func TestTrainerRoundSaveLoadApply(t *testing.T) {
	rt, pipe := setupSD15(t)
	tr := newTrainer(t, pipe)
	calls := 0
	if err := tr.SetProgress(func(done, total uint32) bool {
		calls++
		if done > total {
			t.Errorf("progress %d/%d", done, total)
		}
		return true
	}); err != nil {
		t.Fatal(err)
	}
	m, err := tr.Step(context.Background(), "a red apple", "a blue car")
	if err != nil {
		t.Fatal(err)
	}
	checkFinite(t, m)
	// 2 prompts x one segment (steps 1-2; the last step opens no pool).
	if m.Round != 0 || m.Pools != 2 || m.Pairs == 0 || m.Updates == 0 || m.Backward <= 0 || calls == 0 {
		t.Errorf("metrics %+v after %d progress calls", m, calls)
	}
	dir := t.TempDir()
	// The dialects spo_lora_info reports for the two formats.
	for format, dialect := range map[string]string{"webui": "Kohya", "diffusers": "Peft"} {
		path := filepath.Join(dir, format+".safetensors")
		if err := tr.SaveLora(path, format); err != nil {
			t.Fatal(err)
		}
		if fi, err := os.Stat(path); err != nil || fi.Size() == 0 {
			t.Fatalf("saved LoRA %s: %v", path, err)
		}
		lora, err := rt.LoadLora(path)
		if err != nil {
			t.Fatal(err)
		}
		if got, err := lora.Info("format"); err != nil || got != dialect {
			t.Errorf("format of %s: %q %v", path, got, err)
		}
		if err := pipe.SetLoras(spo.LoraAuto, spo.WeightedLora{Lora: lora, Multiplier: 1}); err != nil {
			t.Error(err)
		}
		lora.Close()
	}
	// Back to a checkpoint: the same round again, bit for bit.
	ckpt := filepath.Join(dir, "trainer.ckpt")
	if err := tr.SaveCheckpoint(ckpt); err != nil {
		t.Fatal(err)
	}
	a, errA := tr.Step(context.Background(), "a red apple")
	if err := tr.LoadCheckpoint(ckpt); err != nil {
		t.Fatal(err)
	}
	b, errB := tr.Step(context.Background(), "a red apple")
	if errA != nil || errB != nil || a.Round != 1 || b.Round != 1 || a.Loss != b.Loss || a.GradNorm != b.GradNorm {
		t.Errorf("after the checkpoint: %+v %v; again: %+v %v", a, errA, b, errB)
	}
	if err := tr.Apply(pipe); err != nil {
		t.Fatal(err)
	}
	if _, err := pipe.Generate(context.Background(), spo.Options{"prompt": "a red apple", "steps": "2"}, nil); err != nil {
		t.Error(err)
	}
}

func TestTrainerErrors(t *testing.T) {
	_, pipe := setupSD15(t)
	missing := root + "/tests/fixtures/train/no-such-folder"
	_, err := pipe.NewTrainer(trainerOptions(missing))
	expectNative(t, err, "no-such-folder")
	_, err = pipe.NewTrainer(spo.Options{"train.lrr": "1"})
	expectCode(t, err, spo.CodeUnknownOption, "train.lrr")
	tr := newTrainer(t, pipe)
	expectCode(t, tr.SaveLora(filepath.Join(t.TempDir(), "x.safetensors"), "ckpt"), spo.CodeInvalidArgument, "ckpt")
	expectCode(t, tr.LoadCheckpoint(sd15Model+"/unet/config.json"), spo.CodeInvalidFile, "config.json")
	_, err = tr.Step(context.Background())
	expectCode(t, err, spo.CodeInvalidArgument, "0 prompts")
	_, err = tr.Step(context.Background(), "a\x00b")
	expectCode(t, err, spo.CodeInvalidArgument, "NUL")
	tr.Close()
	tr.Close() // a second Close is a no-op
	_, err = tr.Step(context.Background(), "a red apple")
	expectCode(t, err, spo.CodeInvalidArgument, "closed")
}

// Pairs from the host's own sampler, as tests/c/trainer.c sends them: one
// update, then the library's named refusals and this binding's length check.
func TestTrainerUpdate(t *testing.T) {
	_, pipe := setupSD15(t)
	tr := newTrainer(t, pipe)
	shape, err := tr.LatentShape()
	if err != nil || shape != [4]uint32{1, 4, 8, 8} {
		t.Fatalf("latent shape %v %v", shape, err)
	}
	n := int(shape[0] * shape[1] * shape[2] * shape[3])
	x := make([]float32, 4*n)
	for i := range x {
		x[i] = float32((i*37)%19)/19 - 0.5
	}
	pair := spo.Pair{Timestep: 334, XtWin: x[:n], XPrevWin: x[n : 2*n], XtLose: x[2*n : 3*n], XPrevLose: x[3*n:]}
	prompts := []string{"a green field"}
	m, err := tr.Update(prompts, []spo.Pair{pair})
	if err != nil {
		t.Fatal(err)
	}
	if m.Pairs != 1 || m.Updates+m.SkippedUpdates != 1 || m.Pools != 0 {
		t.Errorf("metrics %+v", m)
	}
	bad := pair
	bad.Timestep = 500
	_, err = tr.Update(prompts, []spo.Pair{bad})
	expectCode(t, err, spo.CodeInvalidArgument, "schedule")
	bad = pair
	bad.Prompt = 3
	_, err = tr.Update(prompts, []spo.Pair{bad})
	expectCode(t, err, spo.CodeInvalidArgument, "prompt 3")
	bad = pair
	bad.XPrevLose = x[:n-1]
	_, err = tr.Update(prompts, []spo.Pair{pair, bad})
	expectCode(t, err, spo.CodeInvalidArgument, "pair 1: XPrevLose has 255 floats, expected 256")
	if spo.ABIVersion() != spo.HeaderABIVersion {
		t.Errorf("library ABI %d, header %d", spo.ABIVersion(), spo.HeaderABIVersion)
	}
}

// A log function given at creation receives creation's own messages: the
// line naming the execution providers, which SetLog comes too late for.
func TestLogFunctionFromCreation(t *testing.T) {
	var mu sync.Mutex
	var got []string
	rt, err := spo.NewRuntimeWithLog(spo.Options{"ep": "cpu"}, spo.LogInfo, func(l spo.LogLevel, m string) {
		mu.Lock()
		defer mu.Unlock()
		if l == spo.LogInfo && strings.Contains(m, "execution providers") {
			got = append(got, m)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	rt.Close()
	mu.Lock()
	defer mu.Unlock()
	if len(got) != 1 || !strings.Contains(got[0], "execution providers: cpu") {
		t.Errorf("creation messages %q", got)
	}
	_, err = spo.NewRuntimeWithLog(spo.Options{"ep": "cpu"}, spo.LogLevel(9), func(spo.LogLevel, string) {})
	expectCode(t, err, spo.CodeInvalidArgument, "9")
}

// expectNative checks that err is the library's own error (a code from the
// C API and a message naming needle), not one of this binding's checks.
func expectNative(t *testing.T, err error, needle string) {
	t.Helper()
	e, ok := err.(*spo.Error)
	if !ok {
		t.Fatalf("got %v (%T), want an *spo.Error", err, err)
	}
	if e.Code() == spo.CodeOK || e.Code() == spo.CodeInvalidArgument || !strings.Contains(e.Message(), needle) {
		t.Errorf("got code %d %q, want a library code and a message naming %q", e.Code(), e.Message(), needle)
	}
}

// Cancel from another goroutine while the round samples: Step returns
// CodeCancelled, the round does not count, and the trainer trains on.
func TestTrainerCancelFromAnotherGoroutine(t *testing.T) {
	_, pipe := setupSD15(t)
	tr := newTrainer(t, pipe)
	started, cancelled := make(chan struct{}), make(chan struct{})
	var once sync.Once
	if err := tr.SetProgress(func(done, total uint32) bool {
		once.Do(func() { close(started); <-cancelled })
		return true
	}); err != nil {
		t.Fatal(err)
	}
	go func() { <-started; tr.Cancel(); close(cancelled) }()
	_, err := tr.Step(context.Background(), "a red apple")
	expectCode(t, err, spo.CodeCancelled, "")
	// A context that is done cancels too, and the error wraps it.
	ctx, cancel := context.WithCancel(context.Background())
	started, cancelled, once = make(chan struct{}), make(chan struct{}), sync.Once{}
	go func() { <-started; cancel(); time.Sleep(50 * time.Millisecond); close(cancelled) }()
	_, err = tr.Step(ctx, "a red apple")
	expectCode(t, err, spo.CodeCancelled, "")
	if !errors.Is(err, context.Canceled) {
		t.Errorf("%v does not wrap context.Canceled", err)
	}
	if err := tr.SetProgress(nil); err != nil {
		t.Fatal(err)
	}
	m, err := tr.Step(context.Background(), "a red apple")
	if err != nil {
		t.Fatal(err)
	}
	if m.Round != 0 {
		t.Errorf("round %d after two cancelled rounds, want 0", m.Round)
	}
	checkFinite(t, m)
}

type logRecord struct {
	level   spo.LogLevel
	message string
}

type logBook struct {
	mu      sync.Mutex
	records []logRecord
}

func (b *logBook) add(level spo.LogLevel, message string) {
	b.mu.Lock()
	b.records = append(b.records, logRecord{level, message})
	b.mu.Unlock()
}

func (b *logBook) take() []logRecord {
	b.mu.Lock()
	defer b.mu.Unlock()
	r := b.records
	b.records = nil
	return r
}

// Loading a pipeline logs "loaded sd15 pipeline from DIR" at info level.
func TestLogFunction(t *testing.T) {
	rt, err := spo.NewRuntime(spo.Options{"ep": "cpu"})
	if err != nil {
		t.Fatal(err)
	}
	defer rt.Close()
	var book logBook
	load := func() {
		p, err := rt.LoadPipeline(sd15Model, nil)
		if err != nil {
			t.Fatal(err)
		}
		p.Close()
	}
	if err := rt.SetLog(spo.LogDebug, book.add); err != nil {
		t.Fatal(err)
	}
	load()
	found := false
	for _, r := range book.take() {
		if r.level < spo.LogError || r.level > spo.LogDebug {
			t.Errorf("level %d out of range: %q", r.level, r.message)
		}
		if r.level == spo.LogInfo && strings.Contains(r.message, "loaded sd15 pipeline from") &&
			strings.Contains(r.message, "tiny-sd15") {
			found = true
		}
	}
	if !found {
		t.Error("no info message about the pipeline load")
	}
	// At error level the info message is filtered out; nil removes the function.
	if err := rt.SetLog(spo.LogError, book.add); err != nil {
		t.Fatal(err)
	}
	load()
	if got := book.take(); len(got) != 0 {
		t.Errorf("messages at error level: %v", got)
	}
	if err := rt.SetLog(spo.LogInfo, nil); err != nil {
		t.Fatal(err)
	}
	load()
	if got := book.take(); len(got) != 0 {
		t.Errorf("messages after removing the function: %v", got)
	}
	expectCode(t, rt.SetLog(spo.LogLevel(9), book.add), spo.CodeInvalidArgument, "9")
}

// Trainers and logging runtimes dropped without Close are freed by
// finalizers (the race detector and cgocheck watch the callbacks' handles);
// the pipeline takes a new trainer after them.
func TestTrainerGCStress(t *testing.T) {
	_, pipe := setupSD15(t)
	for i := 0; i < 2; i++ {
		rt, err := spo.NewRuntime(spo.Options{"ep": "cpu"})
		if err != nil {
			t.Fatal(err)
		}
		if err := rt.SetLog(spo.LogDebug, func(spo.LogLevel, string) {}); err != nil {
			t.Fatal(err)
		}
		tr, err := pipe.NewTrainer(trainerOptions(trainDir))
		if err != nil {
			t.Fatal(err)
		}
		if err := tr.SetProgress(func(uint32, uint32) bool { return true }); err != nil {
			t.Fatal(err)
		}
		runtime.GC()
	}
	runtime.GC()
	newTrainer(t, pipe).Close()
}
