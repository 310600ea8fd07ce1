using System;
using System.Collections.Generic;
using System.Runtime.InteropServices;
using System.Threading;

namespace Spo
{
    /// <summary>What one training round did (spo_train_metrics, same layout). Times are in seconds.</summary>
    [StructLayout(LayoutKind.Sequential)]
    public struct TrainMetrics
    {
        /// <summary>Rounds completed before this one.</summary>
        public ulong Round;
        /// <summary>Mean loss over the trained pairs (NaN when there were none).</summary>
        public double Loss;
        public uint Pairs;
        public uint Pools;
        /// <summary>Pools whose score gap passed the threshold, over all pools.</summary>
        public double AcceptedRatio;
        /// <summary>Mean preference score of all candidates.</summary>
        public double ScoreMean;
        /// <summary>Mean best-minus-worst score of a pool.</summary>
        public double ScoreGap;
        /// <summary>Mean global gradient norm before clipping.</summary>
        public double GradNorm;
        /// <summary>Branches whose probability ratio left the clamp.</summary>
        public double ClampFraction;
        /// <summary>Optimizer steps applied.</summary>
        public uint Updates;
        /// <summary>Optimizer steps skipped because the loss or a gradient was not finite.</summary>
        public uint SkippedUpdates;
        public double TimeSampling;
        public double TimeScoring;
        public double TimeForward;
        public double TimeBackward;
        public double TimeOptimizer;
        public double TimeTotal;
    }

    /// <summary>An SPO trainer: a LoRA trained on a pipeline's UNet. Its calls must not overlap (the
    /// library throws SpoCode.Busy); Cancel is safe from any thread. It keeps its pipeline alive.</summary>
    public sealed class Trainer : IDisposable
    {
        private readonly TrainerHandle handle;
        private readonly ProgressRelay progress = new ProgressRelay();

        internal Trainer(Pipeline pipeline, IDictionary<string, string> options)
        {
            using (OptionsHandle o = NativeOptions.Create(options))
                SpoException.Check(Native.spo_trainer_create(pipeline.Handle, o, out handle));
        }

        /// <summary>Reports a round's sampled steps, then its trained pairs, on the thread running Step
        /// (null removes it). An exception thrown by Report cancels the round and is rethrown by Step.</summary>
        public void SetProgress(IProgress<JobProgress> progress)
        {
            NativeProgress callback = this.progress.CallbackFor(progress);
            SpoException.Check(Native.spo_trainer_set_progress_callback(handle, callback, IntPtr.Zero));
            this.progress.Set(progress);
            handle.Progress = callback;
        }

        /// <summary>One round: samples the prompts with the current LoRA, scores the candidates, trains on
        /// the kept pairs. A cancelled token cancels the round: OperationCanceledException (its inner
        /// exception the library's SpoException). On any error the trainer is as it was.</summary>
        public TrainMetrics Step(IList<string> prompts, CancellationToken cancellation = default(CancellationToken))
        {
            if (prompts == null) throw new ArgumentNullException("prompts");
            cancellation.ThrowIfCancellationRequested();
            IntPtr[] native = new IntPtr[prompts.Count];
            try
            {
                for (int i = 0; i < native.Length; i++) native[i] = ToHGlobal("prompt " + i, prompts[i]);
                TrainMetrics m;
                ErrorHandle e;
                using (cancellation.Register(Cancel))
                    e = Native.spo_trainer_step(handle, native, (UIntPtr)native.Length, out m);
                progress.RethrowCallbackError(e);
                try { SpoException.Check(e); }
                catch (SpoException ex)
                {
                    if (ex.Code == SpoCode.Cancelled && cancellation.IsCancellationRequested)
                        throw new OperationCanceledException(ex.Message, ex, cancellation);
                    throw;
                }
                return m;
            }
            finally
            {
                foreach (IntPtr p in native) Marshal.FreeHGlobal(p); // FreeHGlobal(Zero) is a no-op
            }
        }

        private static IntPtr ToHGlobal(string what, string s)
        {
            byte[] bytes = Utf8.ToNative(what, s);
            IntPtr p = Marshal.AllocHGlobal(bytes.Length);
            Marshal.Copy(bytes, 0, p, bytes.Length);
            return p;
        }

        /// <summary>Asks a running round to stop (Step then throws SpoCode.Cancelled and the trainer is as
        /// before the round). Any thread; a no-op on a disposed trainer.</summary>
        public void Cancel()
        {
            bool added = false;
            try
            {
                handle.DangerousAddRef(ref added);
                Native.spo_trainer_cancel(handle);
            }
            catch (ObjectDisposedException)
            {
            }
            finally
            {
                if (added) handle.DangerousRelease();
            }
        }

        /// <summary>Writes the current LoRA atomically: "webui" (kohya names, what A1111 and ComfyUI load)
        /// or "diffusers".</summary>
        public void SaveLora(string path, string format = "webui")
        {
            SpoException.Check(Native.spo_trainer_save_lora(handle, Utf8.ToNative("path", path), Utf8.ToNative("format", format)));
        }

        /// <summary>Writes the LoRA, the optimizer state, the round and the seed atomically.</summary>
        public void SaveCheckpoint(string path)
        {
            SpoException.Check(Native.spo_trainer_save_checkpoint(handle, Utf8.ToNative("path", path)));
        }

        /// <summary>Restores a checkpoint of SaveCheckpoint; training then continues bit for bit as the
        /// saved run would have. On error nothing changes.</summary>
        public void LoadCheckpoint(string path)
        {
            SpoException.Check(Native.spo_trainer_load_checkpoint(handle, Utf8.ToNative("path", path)));
        }

        /// <summary>Puts the current LoRA on the pipeline from memory (no file), replacing its LoRAs.</summary>
        public void Apply(Pipeline pipeline)
        {
            if (pipeline == null) throw new ArgumentNullException("pipeline");
            SpoException.Check(Native.spo_trainer_apply(handle, pipeline.Handle));
        }

        /// <summary>Cancels a running round and frees the trainer once no call uses it.</summary>
        public void Dispose()
        {
            Cancel();
            handle.Dispose();
        }
    }
}
