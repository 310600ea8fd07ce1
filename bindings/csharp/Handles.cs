// One SafeHandle subclass per C handle type: the runtime frees each exactly
// once (Dispose, or the finalizer as a safety net) and never while a P/Invoke
// call is using it.
using System;
using System.Runtime.InteropServices;

namespace Spo
{
    internal abstract class SpoHandle : SafeHandle
    {
        protected SpoHandle() : base(IntPtr.Zero, true) { }
        public override bool IsInvalid { get { return handle == IntPtr.Zero; } }
    }

    internal sealed class ErrorHandle : SpoHandle
    {
        protected override bool ReleaseHandle() { Native.spo_error_free(handle); return true; }
    }

    internal sealed class StringHandle : SpoHandle
    {
        protected override bool ReleaseHandle() { Native.spo_string_free(handle); return true; }
    }

    internal sealed class OptionsHandle : SpoHandle
    {
        protected override bool ReleaseHandle() { Native.spo_options_free(handle); return true; }
    }

    internal sealed class RuntimeHandle : SpoHandle
    {
        // The LogRegistry id of the log callback set on this runtime (0: none).
        internal IntPtr LogId;

        // Pipelines keep the native runtime alive after this, so its log
        // callback is removed first: nothing is delivered after Dispose.
        protected override bool ReleaseHandle()
        {
            if (LogId != IntPtr.Zero)
            {
                Native.spo_error_free(Native.spo_runtime_set_log_callback_raw(handle, null, IntPtr.Zero, (int)LogLevel.Error));
                LogRegistry.Unregister(LogId);
                LogId = IntPtr.Zero;
            }
            Native.spo_runtime_free(handle);
            return true;
        }
    }

    internal sealed class PipelineHandle : SpoHandle
    {
        protected override bool ReleaseHandle() { Native.spo_pipeline_free(handle); return true; }
    }

    internal sealed class LoraHandle : SpoHandle
    {
        protected override bool ReleaseHandle() { Native.spo_lora_free(handle); return true; }
    }

    internal sealed class ImagesHandle : SpoHandle
    {
        protected override bool ReleaseHandle() { Native.spo_images_free(handle); return true; }
    }

    internal sealed class JobHandle : SpoHandle
    {
        // The progress delegate lives as long as the native job that may call
        // it: the marshaller keeps this handle alive during every call.
        internal NativeProgress Progress;

        protected override bool ReleaseHandle()
        {
            Native.spo_job_free(handle);
            Progress = null;
            return true;
        }
    }

    internal sealed class TrainerHandle : SpoHandle
    {
        // As JobHandle.Progress: lives as long as the native trainer.
        internal NativeProgress Progress;

        protected override bool ReleaseHandle()
        {
            Native.spo_trainer_free(handle);
            Progress = null;
            return true;
        }
    }
}
