package spo

import "context"

// watchContext calls cancel if ctx is done before the returned stop is
// called; after stop returns, cancel is never called.
func watchContext(ctx context.Context, cancel func()) (stop func()) {
	done, watcherDone := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(watcherDone)
		select {
		case <-ctx.Done():
			cancel()
		case <-done:
		}
	}()
	return func() { close(done); <-watcherDone }
}
