// Text-to-image through the Go binding:
// go run . MODEL_DIR "prompt" OUT.png [LORA.safetensors]
// Ctrl-C cancels the job (context cancellation maps to spo_job_cancel).
package main

import (
	"context"
	"fmt"
	"image/png"
	"os"
	"os/signal"

	"spo-runtime/spo"
)

func main() {
	if len(os.Args) < 4 {
		fmt.Fprintln(os.Stderr, "usage: txt2img MODEL_DIR PROMPT OUT.png [LORA.safetensors]")
		os.Exit(2)
	}
	if err := run(os.Args[1], os.Args[2], os.Args[3], os.Args[4:]); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

func run(model, prompt, out string, loras []string) error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	rt, err := spo.NewRuntime(nil)
	if err != nil {
		return err
	}
	defer rt.Close()
	pipe, err := rt.LoadPipeline(model, nil)
	if err != nil {
		return err
	}
	defer pipe.Close()
	var weighted []spo.WeightedLora
	for _, path := range loras {
		lora, err := rt.LoadLora(path)
		if err != nil {
			return err
		}
		defer lora.Close()
		weighted = append(weighted, spo.WeightedLora{Lora: lora, Multiplier: 0.8})
	}
	if err := pipe.SetLoras(spo.LoraAuto, weighted...); err != nil {
		return err
	}
	images, err := pipe.Generate(ctx, spo.Options{"prompt": prompt, "steps": "8", "seed": "42"},
		func(done, total uint32) bool {
			fmt.Fprintf(os.Stderr, "\rstep %d/%d", done, total)
			return true
		})
	fmt.Fprintln(os.Stderr)
	if err != nil {
		return err
	}
	f, err := os.Create(out)
	if err != nil {
		return err
	}
	if err := png.Encode(f, images[0].RGBA()); err != nil {
		f.Close()
		return err
	}
	fmt.Printf("wrote %s (%dx%d)\n", out, images[0].Width, images[0].Height)
	return f.Close()
}
