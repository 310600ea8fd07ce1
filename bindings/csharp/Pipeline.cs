using System;
using System.Collections.Generic;
using System.Threading;

namespace Spo
{
    /// <summary>How SetLoras applies LoRAs (spo_lora_mode).</summary>
    public enum LoraMode
    {
        Auto = 0,
        Merge = 1,
        Slots = 2,
    }

    /// <summary>A loaded SDXL or SD 1.5 pipeline. Threads may share it, but it runs one job at a time:
    /// creating a second one meanwhile throws SpoException with SpoCode.Busy.</summary>
    public sealed class Pipeline : IDisposable
    {
        internal readonly PipelineHandle Handle;

        internal Pipeline(Runtime runtime, string dir, IDictionary<string, string> options)
        {
            using (OptionsHandle o = NativeOptions.Create(options))
                SpoException.Check(Native.spo_pipeline_load(runtime.Handle, Utf8.ToNative("dir", dir), o, out Handle));
        }

        /// <summary>Answers "kind", "default_size", "ep.unet" and the other keys of spo_pipeline_info.</summary>
        public string Info(string key)
        {
            StringHandle s;
            SpoException.Check(Native.spo_pipeline_info(Handle, Utf8.ToNative("key", key), out s));
            return Utf8.Take(s);
        }

        /// <summary>Creates an SPO trainer from "train.*" options ("train.dir" is required; see
        /// spo_trainer_create in include/spo_runtime.h).</summary>
        public Trainer CreateTrainer(IDictionary<string, string> options)
        {
            return new Trainer(this, options);
        }

        /// <summary>Replaces the pipeline's LoRAs (an empty list removes them). On error the pipeline keeps
        /// its previous LoRAs.</summary>
        public void SetLoras(IList<KeyValuePair<Lora, float>> loras, LoraMode mode = LoraMode.Auto)
        {
            if (loras == null) throw new ArgumentNullException("loras");
            IntPtr[] handles = new IntPtr[loras.Count];
            float[] multipliers = new float[loras.Count];
            int added = 0;
            try
            {
                for (; added < loras.Count; added++)
                {
                    if (loras[added].Key == null) throw new ArgumentNullException("loras", "LoRA " + added + " is null");
                    bool ok = false;
                    loras[added].Key.Handle.DangerousAddRef(ref ok);
                    handles[added] = loras[added].Key.Handle.DangerousGetHandle();
                    multipliers[added] = loras[added].Value;
                }
                SpoException.Check(Native.spo_pipeline_set_loras(Handle, handles, multipliers, (UIntPtr)loras.Count, (int)mode));
            }
            finally
            {
                for (int i = 0; i < added; i++) loras[i].Key.Handle.DangerousRelease();
            }
        }

        /// <summary>Creates a job from job keys ("prompt", "steps", "seed", "width", ...).</summary>
        public Job CreateJob(IDictionary<string, string> options) { return new Job(this, options); }

        /// <summary>Runs a whole job and returns its images; see Job.Run for progress and cancellation.</summary>
        public Image[] Generate(IDictionary<string, string> options, IProgress<JobProgress> progress = null,
                                CancellationToken cancellation = default(CancellationToken))
        {
            using (Job job = CreateJob(options))
            {
                if (progress != null) job.SetProgress(progress);
                job.Run(cancellation);
                return job.TakeImages();
            }
        }

        public void Dispose() { Handle.Dispose(); }
    }
}
