package spo

// #include "spo_runtime.h"
import "C"

import (
	"image"
	"unsafe"
)

// Image is an RGB8 image copied out of the library: Height rows of Width*3
// bytes.
type Image struct {
	Width, Height int
	Pix           []byte
}

func copyImage(v *C.spo_image) Image {
	w, h, stride := int(v.width), int(v.height), int(v.stride)
	img := Image{Width: w, Height: h, Pix: make([]byte, w*h*3)}
	if w == 0 || h == 0 {
		return img
	}
	src := unsafe.Slice((*byte)(unsafe.Pointer(v.data)), stride*(h-1)+w*3)
	for y := 0; y < h; y++ {
		copy(img.Pix[y*w*3:(y+1)*w*3], src[y*stride:y*stride+w*3])
	}
	return img
}

// RGBA converts the image for the image/* packages (png.Encode and the like).
func (m Image) RGBA() *image.RGBA {
	out := image.NewRGBA(image.Rect(0, 0, m.Width, m.Height))
	for i := 0; i < m.Width*m.Height; i++ {
		copy(out.Pix[i*4:i*4+3], m.Pix[i*3:i*3+3])
		out.Pix[i*4+3] = 255
	}
	return out
}
