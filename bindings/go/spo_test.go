package spo_test

// The references are independent of this package: ref.rgb and ref-lora.rgb
// come from tests/bindings/reference.c (the C API alone; `make go-test`
// makes them and names their folder in SPO_BINDINGS_REF), and the PNG from
// the `spo` CLI run by the test itself.

import (
	"bytes"
	"context"
	"errors"
	"image/png"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"spo-runtime/spo"
)

const (
	root     = "../.."
	model    = root + "/tests/fixtures/tiny-sdxl"
	loraFile = root + "/tests/fixtures/lora/tiny-sdxl/lora_a/kohya_flat.safetensors"
)

// jobOptions are the settings of tests/bindings/reference.c.
func jobOptions(seed string) spo.Options {
	return spo.Options{"prompt": "a red fox", "steps": "4", "width": "64", "height": "64",
		"guidance": "5", "scheduler": "euler", "seed": seed}
}

func reference(t *testing.T, name string) []byte {
	t.Helper()
	dir := os.Getenv("SPO_BINDINGS_REF")
	if dir == "" {
		t.Fatal("SPO_BINDINGS_REF is not set: run `make go-test`, which makes the reference images")
	}
	data, err := os.ReadFile(filepath.Join(dir, name))
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func setup(t *testing.T) (*spo.Runtime, *spo.Pipeline) {
	t.Helper()
	rt, err := spo.NewRuntime(spo.Options{"ep": "cpu"})
	if err != nil {
		t.Fatal(err)
	}
	pipe, err := rt.LoadPipeline(model, nil)
	if err != nil {
		rt.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { pipe.Close(); rt.Close() })
	return rt, pipe
}

func generate(t *testing.T, pipe *spo.Pipeline, seed string) []byte {
	t.Helper()
	images, err := pipe.Generate(context.Background(), jobOptions(seed), nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(images) != 1 || images[0].Width != 64 || images[0].Height != 64 {
		t.Fatalf("got %d images, first %dx%d; want one 64x64", len(images), images[0].Width, images[0].Height)
	}
	return images[0].Pix
}

func cliImage(t *testing.T) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "cli.png")
	cmd := exec.Command(root+"/target/release/spo", "generate", "--model", model, "--prompt", "a red fox",
		"--steps", "4", "--width", "64", "--height", "64", "--guidance", "5", "--scheduler", "euler",
		"--seed", "7", "--out", out)
	if msg, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("spo generate: %v\n%s", err, msg)
	}
	f, err := os.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	img, err := png.Decode(f)
	if err != nil {
		t.Fatal(err)
	}
	b := img.Bounds()
	rgb := make([]byte, 0, b.Dx()*b.Dy()*3)
	for y := b.Min.Y; y < b.Max.Y; y++ {
		for x := b.Min.X; x < b.Max.X; x++ {
			r, g, bl, _ := img.At(x, y).RGBA()
			rgb = append(rgb, byte(r>>8), byte(g>>8), byte(bl>>8))
		}
	}
	return rgb
}

func TestGenerateMatchesCAndCLI(t *testing.T) {
	_, pipe := setup(t)
	calls := 0
	images, err := pipe.Generate(context.Background(), jobOptions("7"), func(done, total uint32) bool {
		calls++
		if done != uint32(calls) || total != 4 {
			t.Errorf("progress %d/%d at call %d", done, total, calls)
		}
		return true
	})
	if err != nil {
		t.Fatal(err)
	}
	if calls != 4 {
		t.Errorf("progress called %d times, want 4", calls)
	}
	got := images[0].Pix
	if !bytes.Equal(got, reference(t, "ref.rgb")) {
		t.Error("image differs from the C API's for the same seed")
	}
	if !bytes.Equal(got, cliImage(t)) {
		t.Error("image differs from the spo CLI's for the same seed")
	}
	if bytes.Equal(generate(t, pipe, "8"), got) {
		t.Error("seeds 7 and 8 gave the same image")
	}
}

func TestStepByStepWithPreview(t *testing.T) {
	_, pipe := setup(t)
	job, err := pipe.NewJob(jobOptions("7"))
	if err != nil {
		t.Fatal(err)
	}
	defer job.Close()
	if _, err := job.Preview(); err == nil {
		t.Error("a preview before the first step succeeded")
	}
	for steps := 1; ; steps++ {
		st, err := job.Step()
		if err != nil {
			t.Fatal(err)
		}
		p, err := job.Preview()
		if err != nil {
			t.Fatal(err)
		}
		if p.Step != st.Done || p.Shape != [4]int{1, 4, 8, 8} || len(p.Latents) != 256 {
			t.Fatalf("preview step %d shape %v (%d floats) after step %d", p.Step, p.Shape, len(p.Latents), st.Done)
		}
		if st.Finished {
			if steps != 4 {
				t.Errorf("finished after %d steps, want 4", steps)
			}
			break
		}
	}
	images, err := job.TakeImages()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(images[0].Pix, reference(t, "ref.rgb")) {
		t.Error("stepped image differs from the C API's")
	}
	if _, err := job.TakeImages(); err == nil {
		t.Error("images taken twice")
	}
}

func expectCode(t *testing.T, err error, code spo.Code, needle string) {
	t.Helper()
	var e *spo.Error
	if !errors.As(err, &e) {
		t.Fatalf("got %v (%T), want an *spo.Error with code %d", err, err, code)
	}
	if e.Code() != code || !strings.Contains(e.Message(), needle) {
		t.Errorf("got code %d %q, want code %d containing %q", e.Code(), e.Message(), code, needle)
	}
}

func TestErrors(t *testing.T) {
	rt, pipe := setup(t)
	_, err := pipe.NewJob(spo.Options{"prompt": "x", "stepz": "4"})
	expectCode(t, err, spo.CodeUnknownOption, "stepz")
	_, err = pipe.NewJob(spo.Options{"prompt": "x", "width": "100000"})
	expectCode(t, err, spo.CodeInvalidOptionValue, "limits.max_side")
	_, err = rt.LoadPipeline(root+"/no/such/model", nil)
	expectCode(t, err, spo.CodeInvalidModel, "no/such/model")
	_, err = rt.LoadLora("/no/such.safetensors")
	expectCode(t, err, spo.CodeIO, "/no/such.safetensors")
	_, err = pipe.NewJob(spo.Options{"prompt": "a\x00b"})
	expectCode(t, err, spo.CodeInvalidArgument, "NUL")
	_, err = pipe.Info("nonsense")
	expectCode(t, err, spo.CodeInvalidArgument, "nonsense")
	// After an error the pipeline still works.
	if !bytes.Equal(generate(t, pipe, "7"), reference(t, "ref.rgb")) {
		t.Error("image after errors differs from the C API's")
	}
	lora, err := rt.LoadLora(loraFile)
	if err != nil {
		t.Fatal(err)
	}
	lora.Close()
	lora.Close() // a second Close is a no-op
	_, err = lora.Info("format")
	expectCode(t, err, spo.CodeInvalidArgument, "closed")
}

func TestCancelFromAnotherGoroutineThenReuse(t *testing.T) {
	_, pipe := setup(t)
	job, err := pipe.NewJob(spo.Options{"prompt": "a red fox", "steps": "200", "width": "64", "height": "64"})
	if err != nil {
		t.Fatal(err)
	}
	started, cancelled := make(chan struct{}), make(chan struct{})
	last := uint32(0)
	err = job.SetProgress(func(done, total uint32) bool {
		last = done
		if done == 1 {
			close(started)
			<-cancelled // the next step sees the cancellation
		}
		return true
	})
	if err != nil {
		t.Fatal(err)
	}
	go func() { <-started; job.Cancel(); close(cancelled) }()
	expectCode(t, job.Run(context.Background()), spo.CodeCancelled, "")
	if last != 1 {
		t.Errorf("ran %d steps after the cancel", last-1)
	}
	// The job stays failed; the pipeline is free for a new one at once.
	_, err = job.Step()
	expectCode(t, err, spo.CodeCancelled, "")
	if !bytes.Equal(generate(t, pipe, "7"), reference(t, "ref.rgb")) {
		t.Error("image after a cancel differs from the C API's")
	}
	job.Close()
}

func TestContextCancel(t *testing.T) {
	_, pipe := setup(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	last := uint32(0)
	_, err := pipe.Generate(ctx, spo.Options{"prompt": "a red fox", "steps": "200", "width": "64", "height": "64"},
		func(done, total uint32) bool {
			last = done
			if done == 1 {
				cancel()
				<-ctx.Done()
			}
			return true
		})
	expectCode(t, err, spo.CodeCancelled, "")
	if !errors.Is(err, context.Canceled) {
		t.Errorf("%v does not wrap context.Canceled", err)
	}
	if last >= 200 {
		t.Error("the job ran to the end")
	}
	_, err = pipe.Generate(ctx, jobOptions("7"), nil)
	expectCode(t, err, spo.CodeCancelled, "context")
	if !bytes.Equal(generate(t, pipe, "7"), reference(t, "ref.rgb")) {
		t.Error("image after a context cancel differs from the C API's")
	}
}

func TestProgressPanicReachesCaller(t *testing.T) {
	_, pipe := setup(t)
	func() {
		defer func() {
			if v := recover(); v == nil || !strings.Contains(v.(string), "boom") {
				t.Errorf("recovered %v, want the progress function's panic", v)
			}
		}()
		pipe.Generate(context.Background(), jobOptions("7"), func(done, total uint32) bool { panic("boom") })
	}()
	if !bytes.Equal(generate(t, pipe, "7"), reference(t, "ref.rgb")) {
		t.Error("image after a panicking callback differs from the C API's")
	}
}

func TestLora(t *testing.T) {
	rt, pipe := setup(t)
	lora, err := rt.LoadLora(loraFile)
	if err != nil {
		t.Fatal(err)
	}
	defer lora.Close()
	if format, err := lora.Info("format"); err != nil || format == "" {
		t.Errorf("format %q, %v", format, err)
	}
	if err := pipe.SetLoras(spo.LoraMerge, spo.WeightedLora{Lora: lora, Multiplier: 0.8}); err != nil {
		t.Fatal(err)
	}
	withLora := generate(t, pipe, "7")
	if !bytes.Equal(withLora, reference(t, "ref-lora.rgb")) {
		t.Error("image with the LoRA differs from the C API's")
	}
	if bytes.Equal(withLora, reference(t, "ref.rgb")) {
		t.Error("the LoRA changed nothing")
	}
	err = pipe.SetLoras(spo.LoraMerge, spo.WeightedLora{Lora: nil, Multiplier: 1})
	expectCode(t, err, spo.CodeNullArgument, "nil")
	if err := pipe.SetLoras(spo.LoraMerge); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(generate(t, pipe, "7"), reference(t, "ref.rgb")) {
		t.Error("image after removing the LoRA differs from the C API's")
	}
}

// Handles dropped without Close are freed by finalizers: a dropped job
// frees its pipeline's job slot once collected, which the next NewJob sees.
func TestGCStress(t *testing.T) {
	rt, pipe := setup(t)
	for i := 0; i < 100; i++ {
		if _, err := rt.LoadLora(loraFile); err != nil {
			t.Fatal(err)
		}
		job := newJobAfterGC(t, pipe)
		if i%10 == 0 {
			if _, err := job.Step(); err != nil {
				t.Fatal(err)
			}
		}
		// job is dropped here, still open
	}
	r2, err := spo.NewRuntime(spo.Options{"ep": "cpu"})
	if err != nil {
		t.Fatal(err)
	}
	p2, err := r2.LoadPipeline(model, nil)
	if err != nil {
		t.Fatal(err)
	}
	_ = p2 // both dropped: the pipeline keeps the runtime alive until collected
	runtime.GC()
	if !bytes.Equal(generate(t, pipe, "7"), reference(t, "ref.rgb")) {
		t.Error("image after the GC loop differs from the C API's")
	}
}

func newJobAfterGC(t *testing.T, pipe *spo.Pipeline) *spo.Job {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		job, err := pipe.NewJob(jobOptions("7"))
		var e *spo.Error
		if err == nil {
			return job
		}
		if !errors.As(err, &e) || e.Code() != spo.CodeBusy || time.Now().After(deadline) {
			t.Fatalf("NewJob: %v (the dropped job was not freed by its finalizer)", err)
		}
		runtime.GC()
		time.Sleep(time.Millisecond)
	}
}

// Goroutines each owning a pipeline, sharing one runtime (run with -race).
func TestGoroutinesShareRuntime(t *testing.T) {
	rt, _ := setup(t)
	want := reference(t, "ref.rgb")
	var wg sync.WaitGroup
	for g := 0; g < 3; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			pipe, err := rt.LoadPipeline(model, nil)
			if err != nil {
				t.Error(err)
				return
			}
			defer pipe.Close()
			for i := 0; i < 2; i++ {
				images, err := pipe.Generate(context.Background(), jobOptions("7"), func(done, total uint32) bool { return true })
				if err != nil {
					t.Error(err)
					return
				}
				if !bytes.Equal(images[0].Pix, want) {
					t.Errorf("goroutine %d run %d: image differs from the C API's", g, i)
				}
			}
		}(g)
	}
	wg.Wait()
}
