using System;
using System.Collections.Generic;
using System.Threading;

namespace Spo
{
    /// <summary>Steps done and the total, reported after each denoising step.</summary>
    public struct JobProgress
    {
        public uint Done;
        public uint Total;
    }

    /// <summary>Where a job stands after Step.</summary>
    public struct JobStatus
    {
        public uint Done;
        public uint Total;
        public bool Finished;
    }

    /// <summary>The predicted x0 of the latest finished step, NCHW latents.</summary>
    public sealed class Preview
    {
        public int[] Shape;
        public uint Step;
        public float[] Latents;
    }

    /// <summary>One generation. Step, Run, Preview and TakeImages must not overlap on one job (the
    /// library throws SpoCode.Busy); Cancel is safe from any thread.</summary>
    public sealed class Job : IDisposable
    {
        private readonly JobHandle handle;
        private readonly ProgressRelay progress = new ProgressRelay();

        internal Job(Pipeline pipeline, IDictionary<string, string> options)
        {
            using (OptionsHandle o = NativeOptions.Create(options))
                SpoException.Check(Native.spo_job_create(pipeline.Handle, o, out handle));
        }

        /// <summary>Reports each finished step on the thread running Step or Run (null removes it). An
        /// exception thrown by Report cancels the job and is rethrown by that Step or Run.</summary>
        public void SetProgress(IProgress<JobProgress> progress)
        {
            NativeProgress callback = this.progress.CallbackFor(progress);
            SpoException.Check(Native.spo_job_set_progress_callback(handle, callback, IntPtr.Zero));
            this.progress.Set(progress);
            handle.Progress = callback;
        }

        /// <summary>Advances one denoising step, so a host can spread a job over frames.</summary>
        public JobStatus Step()
        {
            NativeJobStatus s;
            ErrorHandle e = Native.spo_job_step(handle, out s);
            progress.RethrowCallbackError(e);
            SpoException.Check(e);
            return new JobStatus { Done = s.Done, Total = s.Total, Finished = s.Finished != 0 };
        }

        /// <summary>Runs the job to the end. When the token is cancelled first the job is cancelled and
        /// an OperationCanceledException (its inner exception the library's SpoException) is thrown.</summary>
        public void Run(CancellationToken cancellation = default(CancellationToken))
        {
            cancellation.ThrowIfCancellationRequested();
            ErrorHandle e;
            using (cancellation.Register(Cancel))
                e = Native.spo_job_run(handle);
            progress.RethrowCallbackError(e);
            try
            {
                SpoException.Check(e);
            }
            catch (SpoException ex)
            {
                if (ex.Code == SpoCode.Cancelled && cancellation.IsCancellationRequested)
                    throw new OperationCanceledException(ex.Message, ex, cancellation);
                throw;
            }
        }

        /// <summary>Asks a running job to stop (it then fails with SpoCode.Cancelled and the pipeline is
        /// free for a new job). Any thread; a no-op on a disposed job.</summary>
        public void Cancel()
        {
            bool added = false;
            try
            {
                handle.DangerousAddRef(ref added);
                Native.spo_job_cancel(handle);
            }
            catch (ObjectDisposedException)
            {
            }
            finally
            {
                if (added) handle.DangerousRelease();
            }
        }

        /// <summary>Copies the x0 latents of the latest step; callable from the progress callback.</summary>
        public Preview Preview()
        {
            UIntPtr[] shape = new UIntPtr[4];
            uint step;
            SpoException.Check(Native.spo_job_preview(handle, null, UIntPtr.Zero, shape, out step));
            int n = 1;
            int[] dims = new int[4];
            for (int i = 0; i < 4; i++) { dims[i] = checked((int)shape[i].ToUInt64()); n = checked(n * dims[i]); }
            float[] data = new float[n];
            SpoException.Check(Native.spo_job_preview(handle, data, (UIntPtr)n, shape, out step));
            return new Preview { Shape = dims, Step = step, Latents = data };
        }

        /// <summary>Copies out the images of a finished job (once).</summary>
        public Image[] TakeImages()
        {
            ImagesHandle images;
            SpoException.Check(Native.spo_job_take_images(handle, out images));
            using (images)
            {
                Image[] result = new Image[(int)Native.spo_images_count(images).ToUInt64()];
                for (int i = 0; i < result.Length; i++)
                {
                    NativeImage v;
                    SpoException.Check(Native.spo_images_get(images, (UIntPtr)i, out v));
                    result[i] = Image.Copy(v);
                }
                return result;
            }
        }

        /// <summary>Cancels the job if it runs and frees it once no call uses it.</summary>
        public void Dispose()
        {
            Cancel();
            handle.Dispose();
        }
    }
}
