package spo_test

// The references are independent of this package: ref.rgb and ref-lora.rgb
// come from tests/bindings/reference.c (the C API alone) and the PNG from the
// `spo` CLI run by the test itself, all rendering the case file
// tests/bindings/case.txt. `make go-test` makes the references and names the
// case file and their folder in SPO_BINDINGS_CASE and SPO_BINDINGS_REF.

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"image/png"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"spo-runtime/spo"
)

const root = "../.."

// refCase is tests/bindings/case.txt: paths relative to the repository root.
type refCase struct {
	model, lora string
	multiplier  float32
	job         spo.Options
}

var (
	caseOnce sync.Once
	theCase  refCase
	caseErr  error
)

func loadCase(t *testing.T) refCase {
	t.Helper()
	caseOnce.Do(func() { theCase, caseErr = readCase(os.Getenv("SPO_BINDINGS_CASE")) })
	if caseErr != nil {
		t.Fatal(caseErr)
	}
	return theCase
}

func readCase(path string) (refCase, error) {
	c := refCase{job: spo.Options{}}
	if path == "" {
		return c, errors.New("SPO_BINDINGS_CASE is not set: run `make go-test`, which makes the reference images")
	}
	f, err := os.Open(path)
	if err != nil {
		return c, err
	}
	defer f.Close()
	lines := bufio.NewScanner(f)
	for lines.Scan() {
		key, value, ok := strings.Cut(lines.Text(), "=")
		switch {
		case strings.HasPrefix(key, "#") || key == "":
		case !ok:
			return c, errors.New(path + ": line without '=': " + key)
		case strings.HasPrefix(key, "job."):
			c.job[strings.TrimPrefix(key, "job.")] = value
		case key == "model":
			c.model = filepath.Join(root, value)
		case key == "lora":
			c.lora = filepath.Join(root, value)
		case key == "lora_multiplier":
			m, err := strconv.ParseFloat(value, 32)
			if err != nil {
				return c, err
			}
			c.multiplier = float32(m)
		}
	}
	return c, lines.Err()
}

// jobOptions are the case's job settings with some replaced.
func jobOptions(t *testing.T, replace ...string) spo.Options {
	t.Helper()
	opts := spo.Options{}
	for k, v := range loadCase(t).job {
		opts[k] = v
	}
	for i := 0; i+1 < len(replace); i += 2 {
		opts[replace[i]] = replace[i+1]
	}
	return opts
}

// caseInt is an integer job setting of the case.
func caseInt(t *testing.T, key string) int {
	t.Helper()
	v, err := strconv.Atoi(loadCase(t).job[key])
	if err != nil {
		t.Fatalf("case job.%s: %v", key, err)
	}
	return v
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
	pipe, err := rt.LoadPipeline(loadCase(t).model, nil)
	if err != nil {
		rt.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { pipe.Close(); rt.Close() })
	return rt, pipe
}

func generate(t *testing.T, pipe *spo.Pipeline, seed string) []byte {
	t.Helper()
	images, err := pipe.Generate(context.Background(), jobOptions(t, "seed", seed), nil)
	if err != nil {
		t.Fatal(err)
	}
	w, h := caseInt(t, "width"), caseInt(t, "height")
	if len(images) != 1 || images[0].Width != w || images[0].Height != h {
		t.Fatalf("got %d images, first %dx%d; want one %dx%d", len(images), images[0].Width, images[0].Height, w, h)
	}
	return images[0].Pix
}

func cliImage(t *testing.T) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "cli.png")
	args := []string{"generate", "--model", loadCase(t).model, "--out", out}
	for k, v := range loadCase(t).job {
		args = append(args, "--"+k, v)
	}
	cmd := exec.Command(root+"/target/release/spo", args...)
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
	calls, steps := 0, caseInt(t, "steps")
	images, err := pipe.Generate(context.Background(), jobOptions(t), func(done, total uint32) bool {
		calls++
		if done != uint32(calls) || total != uint32(steps) {
			t.Errorf("progress %d/%d at call %d", done, total, calls)
		}
		return true
	})
	if err != nil {
		t.Fatal(err)
	}
	if calls != steps {
		t.Errorf("progress called %d times, want %d", calls, steps)
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
	job, err := pipe.NewJob(jobOptions(t))
	if err != nil {
		t.Fatal(err)
	}
	defer job.Close()
	if _, err := job.Preview(); err == nil {
		t.Error("a preview before the first step succeeded")
	}
	// SDXL latents: 4 channels at 1/8 of the image size.
	shape := [4]int{1, 4, caseInt(t, "height") / 8, caseInt(t, "width") / 8}
	for steps := 1; ; steps++ {
		st, err := job.Step()
		if err != nil {
			t.Fatal(err)
		}
		p, err := job.Preview()
		if err != nil {
			t.Fatal(err)
		}
		if p.Step != st.Done || p.Shape != shape || len(p.Latents) != shape[1]*shape[2]*shape[3] {
			t.Fatalf("preview step %d shape %v (%d floats) after step %d", p.Step, p.Shape, len(p.Latents), st.Done)
		}
		if st.Finished {
			if steps != caseInt(t, "steps") {
				t.Errorf("finished after %d steps, want %d", steps, caseInt(t, "steps"))
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
	_, err := pipe.NewJob(jobOptions(t, "stepz", "4"))
	expectCode(t, err, spo.CodeUnknownOption, "stepz")
	_, err = pipe.NewJob(jobOptions(t, "width", "100000"))
	expectCode(t, err, spo.CodeInvalidOptionValue, "limits.max_side")
	_, err = rt.LoadPipeline(root+"/no/such/model", nil)
	expectCode(t, err, spo.CodeInvalidModel, "no/such/model")
	_, err = rt.LoadLora("/no/such.safetensors")
	expectCode(t, err, spo.CodeIO, "/no/such.safetensors")
	_, err = pipe.NewJob(jobOptions(t, "prompt", "a\x00b"))
	expectCode(t, err, spo.CodeInvalidArgument, "NUL")
	_, err = pipe.Info("nonsense")
	expectCode(t, err, spo.CodeInvalidArgument, "nonsense")
	// After an error the pipeline still works.
	if !bytes.Equal(generate(t, pipe, loadCase(t).job["seed"]), reference(t, "ref.rgb")) {
		t.Error("image after errors differs from the C API's")
	}
	lora, err := rt.LoadLora(loadCase(t).lora)
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
	job, err := pipe.NewJob(jobOptions(t, "steps", "200"))
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
	if !bytes.Equal(generate(t, pipe, loadCase(t).job["seed"]), reference(t, "ref.rgb")) {
		t.Error("image after a cancel differs from the C API's")
	}
	job.Close()
}

// Close from another goroutine during Run cancels the job, waits for Run to
// return, then frees it; the closed job answers with an error.
func TestCloseDuringRun(t *testing.T) {
	_, pipe := setup(t)
	job, err := pipe.NewJob(jobOptions(t, "steps", "200"))
	if err != nil {
		t.Fatal(err)
	}
	started, closed := make(chan struct{}), make(chan struct{})
	err = job.SetProgress(func(done, total uint32) bool {
		if done == 1 {
			close(started)
		}
		return true
	})
	if err != nil {
		t.Fatal(err)
	}
	go func() { <-started; job.Close(); close(closed) }()
	expectCode(t, job.Run(context.Background()), spo.CodeCancelled, "")
	<-closed
	_, err = job.Step()
	expectCode(t, err, spo.CodeInvalidArgument, "closed")
	if !bytes.Equal(generate(t, pipe, loadCase(t).job["seed"]), reference(t, "ref.rgb")) {
		t.Error("image after a Close during Run differs from the C API's")
	}
}

func TestContextCancel(t *testing.T) {
	_, pipe := setup(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	last := uint32(0)
	_, err := pipe.Generate(ctx, jobOptions(t, "steps", "200"),
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
	_, err = pipe.Generate(ctx, jobOptions(t), nil)
	expectCode(t, err, spo.CodeCancelled, "context")
	if !bytes.Equal(generate(t, pipe, loadCase(t).job["seed"]), reference(t, "ref.rgb")) {
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
		pipe.Generate(context.Background(), jobOptions(t), func(done, total uint32) bool { panic("boom") })
	}()
	if !bytes.Equal(generate(t, pipe, loadCase(t).job["seed"]), reference(t, "ref.rgb")) {
		t.Error("image after a panicking callback differs from the C API's")
	}
}

func TestLora(t *testing.T) {
	rt, pipe := setup(t)
	lora, err := rt.LoadLora(loadCase(t).lora)
	if err != nil {
		t.Fatal(err)
	}
	defer lora.Close()
	if format, err := lora.Info("format"); err != nil || format == "" {
		t.Errorf("format %q, %v", format, err)
	}
	if err := pipe.SetLoras(spo.LoraMerge, spo.WeightedLora{Lora: lora, Multiplier: loadCase(t).multiplier}); err != nil {
		t.Fatal(err)
	}
	withLora := generate(t, pipe, loadCase(t).job["seed"])
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
	if !bytes.Equal(generate(t, pipe, loadCase(t).job["seed"]), reference(t, "ref.rgb")) {
		t.Error("image after removing the LoRA differs from the C API's")
	}
}

// Handles dropped without Close are freed by finalizers: a dropped job
// frees its pipeline's job slot once collected, which the next NewJob sees.
func TestGCStress(t *testing.T) {
	rt, pipe := setup(t)
	for i := 0; i < 100; i++ {
		if _, err := rt.LoadLora(loadCase(t).lora); err != nil {
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
	p2, err := r2.LoadPipeline(loadCase(t).model, nil)
	if err != nil {
		t.Fatal(err)
	}
	_ = p2 // both dropped: the pipeline keeps the runtime alive until collected
	// The last dropped job's finalizer frees the slot.
	job := newJobAfterGC(t, pipe)
	defer job.Close()
	if err := job.Run(context.Background()); err != nil {
		t.Fatal(err)
	}
	images, err := job.TakeImages()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(images[0].Pix, reference(t, "ref.rgb")) {
		t.Error("image after the GC loop differs from the C API's")
	}
}

func newJobAfterGC(t *testing.T, pipe *spo.Pipeline) *spo.Job {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		job, err := pipe.NewJob(jobOptions(t))
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
			pipe, err := rt.LoadPipeline(loadCase(t).model, nil)
			if err != nil {
				t.Error(err)
				return
			}
			defer pipe.Close()
			for i := 0; i < 2; i++ {
				images, err := pipe.Generate(context.Background(), jobOptions(t), func(done, total uint32) bool { return true })
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
