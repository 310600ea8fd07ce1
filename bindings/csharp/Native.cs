// P/Invoke declarations of include/spo_runtime.h. Every handle crosses as a
// SafeHandle subclass, so a call in flight keeps its handle alive and a
// handle is freed exactly once. Strings cross as NUL-terminated UTF-8 bytes.
using System;
using System.Runtime.InteropServices;

namespace Spo
{
    [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
    internal delegate int NativeProgress(IntPtr userData, uint done, uint total);

    [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
    internal delegate void NativeLog(IntPtr userData, int level, IntPtr message);

    [StructLayout(LayoutKind.Sequential)]
    internal struct NativeJobStatus
    {
        public uint Done;
        public uint Total;
        public int Finished;
    }

    /// <summary>spo_train_pair: the latents are pinned arrays for the duration of the call.</summary>
    [StructLayout(LayoutKind.Sequential)]
    internal struct NativeTrainPair
    {
        public uint Prompt;
        public long Timestep;
        public IntPtr XtWin;
        public IntPtr XPrevWin;
        public IntPtr XtLose;
        public IntPtr XPrevLose;
    }

    [StructLayout(LayoutKind.Sequential)]
    internal struct NativeImage
    {
        public uint Width;
        public uint Height;
        public uint Stride;
        public IntPtr Data;
    }

    internal static class Native
    {
        private const string Lib = "spo_runtime";
        // SPO_ABI_VERSION of the header these declarations follow.
        internal const uint AbiVersion = 1;

        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern IntPtr spo_version();
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern uint spo_abi_version();
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern void spo_string_free(IntPtr s);

        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern uint spo_error_code(ErrorHandle error);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern IntPtr spo_error_message(ErrorHandle error);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern void spo_error_free(IntPtr error);

        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern ErrorHandle spo_options_create(out OptionsHandle options);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern ErrorHandle spo_options_set(OptionsHandle options, byte[] key, byte[] value);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern ErrorHandle spo_options_set_log_callback(OptionsHandle options, NativeLog callback, IntPtr userData, int maxLevel);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern void spo_options_free(IntPtr options);

        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern ErrorHandle spo_runtime_create(uint abi, OptionsHandle options, out RuntimeHandle runtime);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern ErrorHandle spo_runtime_info(RuntimeHandle runtime, byte[] key, out StringHandle value);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern void spo_runtime_free(IntPtr runtime);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern ErrorHandle spo_runtime_set_log_callback(RuntimeHandle runtime, NativeLog callback, IntPtr userData, int maxLevel);
        // The same for RuntimeHandle.ReleaseHandle, which holds only the raw pointer.
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl, EntryPoint = "spo_runtime_set_log_callback")]
        internal static extern IntPtr spo_runtime_set_log_callback_raw(IntPtr runtime, NativeLog callback, IntPtr userData, int maxLevel);

        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern ErrorHandle spo_pipeline_load(RuntimeHandle runtime, byte[] dir, OptionsHandle options, out PipelineHandle pipeline);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern ErrorHandle spo_pipeline_info(PipelineHandle pipeline, byte[] key, out StringHandle value);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern ErrorHandle spo_pipeline_set_loras(PipelineHandle pipeline, IntPtr[] loras, float[] multipliers, UIntPtr n, int mode);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern void spo_pipeline_free(IntPtr pipeline);

        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern ErrorHandle spo_lora_load(RuntimeHandle runtime, byte[] path, out LoraHandle lora);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern ErrorHandle spo_lora_info(LoraHandle lora, byte[] key, out StringHandle value);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern void spo_lora_free(IntPtr lora);

        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern ErrorHandle spo_job_create(PipelineHandle pipeline, OptionsHandle options, out JobHandle job);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern ErrorHandle spo_job_set_progress_callback(JobHandle job, NativeProgress callback, IntPtr userData);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern ErrorHandle spo_job_step(JobHandle job, out NativeJobStatus status);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern ErrorHandle spo_job_run(JobHandle job);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern void spo_job_cancel(JobHandle job);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern ErrorHandle spo_job_preview(JobHandle job, float[] data, UIntPtr capacity, UIntPtr[] shape, out uint step);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern ErrorHandle spo_job_take_images(JobHandle job, out ImagesHandle images);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern void spo_job_free(IntPtr job);

        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern ErrorHandle spo_trainer_create(PipelineHandle pipeline, OptionsHandle options, out TrainerHandle trainer);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern ErrorHandle spo_trainer_set_progress_callback(TrainerHandle trainer, NativeProgress callback, IntPtr userData);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern ErrorHandle spo_trainer_step(TrainerHandle trainer, IntPtr[] prompts, UIntPtr n, out TrainMetrics metrics);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern ErrorHandle spo_trainer_update(TrainerHandle trainer, IntPtr[] prompts, UIntPtr nPrompts,
            [In] NativeTrainPair[] pairs, UIntPtr nPairs, out TrainMetrics metrics);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern ErrorHandle spo_trainer_latent_shape(TrainerHandle trainer, [Out] uint[] shape);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern void spo_trainer_cancel(TrainerHandle trainer);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern ErrorHandle spo_trainer_save_lora(TrainerHandle trainer, byte[] path, byte[] format);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern ErrorHandle spo_trainer_save_checkpoint(TrainerHandle trainer, byte[] path);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern ErrorHandle spo_trainer_load_checkpoint(TrainerHandle trainer, byte[] path);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern ErrorHandle spo_trainer_apply(TrainerHandle trainer, PipelineHandle pipeline);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern void spo_trainer_free(IntPtr trainer);

        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern UIntPtr spo_images_count(ImagesHandle images);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern ErrorHandle spo_images_get(ImagesHandle images, UIntPtr index, out NativeImage image);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern void spo_images_free(IntPtr images);
    }
}
