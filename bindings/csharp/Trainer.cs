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

    /// <summary>One (win, lose) pair from the host's own sampler (spo_train_pair): the transitions
    /// x_t -> x_prev of each branch at Timestep (one of the trainer's DDIM schedule), conditioned on
    /// prompts[Prompt] of the Update call. Each latent holds LatentShape()'s product of floats (NCHW,
    /// batch 1); a pool's shared x_t may be the same array in both branches.</summary>
    public sealed class TrainPair
    {
        public uint Prompt;
        public long Timestep;
        public float[] XtWin;
        public float[] XPrevWin;
        public float[] XtLose;
        public float[] XPrevLose;

        internal float[][] Latents { get { return new[] { XtWin, XPrevWin, XtLose, XPrevLose }; } }
        internal static readonly string[] Fields = { "XtWin", "XPrevWin", "XtLose", "XPrevLose" };
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
            IntPtr[] native = NativePrompts(prompts);
            try
            {
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
                FreePrompts(native);
            }
        }

        /// <summary>The shape of one latent of Update's pairs: [1, C, h, w].</summary>
        public uint[] LatentShape()
        {
            uint[] shape = new uint[4];
            SpoException.Check(Native.spo_trainer_latent_shape(handle, shape));
            return shape;
        }

        /// <summary>Trains on pairs from the host's own sampler: the mini-batches, gradient accumulation,
        /// clipping and AdamW of a round, without sampling. A missing or wrong-length latent throws
        /// ArgumentException naming the pair and the field; on any error nothing changes.</summary>
        public TrainMetrics Update(IList<string> prompts, IList<TrainPair> pairs)
        {
            if (prompts == null) throw new ArgumentNullException("prompts");
            if (pairs == null) throw new ArgumentNullException("pairs");
            uint[] shape = LatentShape();
            long n = (long)shape[0] * shape[1] * shape[2] * shape[3];
            var pins = new List<GCHandle>();
            IntPtr[] native = null;
            try
            {
                var nativePairs = new NativeTrainPair[pairs.Count];
                for (int i = 0; i < pairs.Count; i++)
                    nativePairs[i] = PinPair(i, pairs[i], n, pins);
                native = NativePrompts(prompts);
                TrainMetrics m;
                SpoException.Check(Native.spo_trainer_update(handle, native, (UIntPtr)native.Length, nativePairs,
                    (UIntPtr)nativePairs.Length, out m));
                return m;
            }
            finally
            {
                if (native != null) FreePrompts(native);
                foreach (GCHandle h in pins) h.Free();
            }
        }

        private static NativeTrainPair PinPair(int index, TrainPair pair, long n, List<GCHandle> pins)
        {
            if (pair == null) throw new ArgumentNullException("pairs", "pair " + index + " is null");
            float[][] latents = pair.Latents;
            var at = new IntPtr[4];
            for (int k = 0; k < 4; k++)
            {
                float[] x = latents[k];
                if (x == null || x.LongLength != n)
                    throw new ArgumentException(string.Format("pair {0}: {1} has {2} floats, expected {3} (LatentShape)",
                        index, TrainPair.Fields[k], x == null ? "no" : x.LongLength.ToString(), n), "pairs");
                GCHandle h = GCHandle.Alloc(x, GCHandleType.Pinned);
                pins.Add(h);
                at[k] = h.AddrOfPinnedObject();
            }
            return new NativeTrainPair
            {
                Prompt = pair.Prompt, Timestep = pair.Timestep,
                XtWin = at[0], XPrevWin = at[1], XtLose = at[2], XPrevLose = at[3],
            };
        }

        /// <summary>The prompts as NUL-terminated UTF-8 in unmanaged memory; free with FreePrompts.</summary>
        private static IntPtr[] NativePrompts(IList<string> prompts)
        {
            IntPtr[] native = new IntPtr[prompts.Count];
            try
            {
                for (int i = 0; i < native.Length; i++) native[i] = ToHGlobal("prompt " + i, prompts[i]);
            }
            catch
            {
                FreePrompts(native);
                throw;
            }
            return native;
        }

        private static void FreePrompts(IntPtr[] native)
        {
            foreach (IntPtr p in native) Marshal.FreeHGlobal(p); // FreeHGlobal(Zero) is a no-op
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
