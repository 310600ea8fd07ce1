using System;
using System.Runtime.ExceptionServices;
using System.Threading;

namespace Spo
{
    // Relays a job's or trainer's native progress calls to an IProgress. An
    // exception thrown by Report must not unwind through the library's native
    // frames: it cancels the work and is rethrown by the call that ran it.
    internal sealed class ProgressRelay
    {
        private IProgress<JobProgress> progress;
        private ExceptionDispatchInfo error;

        // Keep this alive (in the native object's handle) while native code may call it.
        internal readonly NativeProgress Callback;

        internal ProgressRelay() { Callback = OnProgress; }

        // The callback to register for progress (null for none); call Set once registered.
        internal NativeProgress CallbackFor(IProgress<JobProgress> progress) { return progress == null ? null : Callback; }

        internal void Set(IProgress<JobProgress> progress) { this.progress = progress; }

        private int OnProgress(IntPtr userData, uint done, uint total)
        {
            try
            {
                IProgress<JobProgress> p = progress;
                if (p != null) p.Report(new JobProgress { Done = done, Total = total });
                return 0;
            }
            catch (Exception e)
            {
                error = ExceptionDispatchInfo.Capture(e);
                return 1;
            }
        }

        // Rethrows an exception of Report (freeing the call's error, which is
        // then only the cancellation it caused); else returns.
        internal void RethrowCallbackError(ErrorHandle e)
        {
            ExceptionDispatchInfo caught = Interlocked.Exchange(ref error, null);
            if (caught == null) return;
            e.Dispose();
            caught.Throw();
        }
    }
}
