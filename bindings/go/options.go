package spo

// #include <stdlib.h>
// #include "spo_runtime.h"
import "C"

import (
	"sort"
	"unsafe"
)

// Options are the string settings of a runtime, pipeline or job (the keys
// are listed in include/spo_runtime.h). A nil map means the defaults.
type Options map[string]string

// cOptions builds a C options object; the caller frees it with
// C.spo_options_free. Keys are applied in sorted order so that, of several
// bad keys, the same one is reported every time.
func (o Options) cOptions() (*C.spo_options, error) {
	var opts *C.spo_options
	if err := takeError(C.spo_options_create(&opts)); err != nil {
		return nil, err
	}
	keys := make([]string, 0, len(o))
	for k := range o {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		if err := setOption(opts, k, o[k]); err != nil {
			C.spo_options_free(opts)
			return nil, err
		}
	}
	return opts, nil
}

func setOption(opts *C.spo_options, key, value string) error {
	if err := checkString("option key", key); err != nil {
		return err
	}
	if err := checkString("value of option "+key, value); err != nil {
		return err
	}
	ck, cv := C.CString(key), C.CString(value)
	defer C.free(unsafe.Pointer(ck))
	defer C.free(unsafe.Pointer(cv))
	return takeError(C.spo_options_set(opts, ck, cv))
}

// withOptions runs f with the C form of o (NULL for a nil map).
func withOptions(o Options, f func(*C.spo_options) error) error {
	if o == nil {
		return f(nil)
	}
	opts, err := o.cOptions()
	if err != nil {
		return err
	}
	defer C.spo_options_free(opts)
	return f(opts)
}

// cString converts s for one call; free the result with C.free.
func cString(what, s string) (*C.char, error) {
	if err := checkString(what, s); err != nil {
		return nil, err
	}
	return C.CString(s), nil
}

// takeString copies and frees a string the library returned.
func takeString(s *C.char) string {
	defer C.spo_string_free(s)
	return C.GoString(s)
}
