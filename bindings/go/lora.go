package spo

// #include <stdlib.h>
// #include "spo_runtime.h"
import "C"

import (
	"runtime"
	"unsafe"
)

// Lora is a loaded LoRA file: immutable, shareable between pipelines and
// goroutines. Pipelines it was applied to keep what they need after Close.
type Lora struct{ h *handle }

// LoadLora reads a LoRA safetensors file (kohya/webui, diffusers/PEFT,
// LyCORIS), within the runtime's "limits.max_file_bytes".
func (r *Runtime) LoadLora(path string) (*Lora, error) {
	rp, err := r.h.acquire()
	if err != nil {
		return nil, err
	}
	defer r.h.release()
	cp, err := cString("LoRA path", path)
	if err != nil {
		return nil, err
	}
	defer C.free(unsafe.Pointer(cp))
	var l *C.spo_lora
	if err := takeError(C.spo_lora_load((*C.spo_runtime)(rp), cp, &l)); err != nil {
		return nil, err
	}
	lora := &Lora{h: newHandle("LoRA", unsafe.Pointer(l))}
	runtime.SetFinalizer(lora, (*Lora).Close)
	return lora, nil
}

// Info answers "format", "dialect", "modules", "rank", "alpha", "path".
func (l *Lora) Info(key string) (string, error) {
	return askInfo(l.h, key, func(p unsafe.Pointer, k *C.char, out **C.char) *C.spo_error {
		return C.spo_lora_info((*C.spo_lora)(p), k, out)
	})
}

// Close frees the LoRA handle. It always returns nil.
func (l *Lora) Close() error {
	l.h.close(nil, func(p unsafe.Pointer) { C.spo_lora_free((*C.spo_lora)(p)) })
	runtime.SetFinalizer(l, nil)
	return nil
}

// LoraMode is how Pipeline.SetLoras applies LoRAs (spo_lora_mode).
type LoraMode int32

// The modes of the C API.
const (
	LoraAuto  = LoraMode(C.SPO_LORA_AUTO)
	LoraMerge = LoraMode(C.SPO_LORA_MERGE)
	LoraSlots = LoraMode(C.SPO_LORA_SLOTS)
)

// WeightedLora is one LoRA with its multiplier.
type WeightedLora struct {
	Lora       *Lora
	Multiplier float32
}
