using System;
using System.Collections.Generic;

namespace Spo
{
    /// <summary>A loaded ONNX Runtime with its execution providers. Thread-safe: share it. Pipelines keep
    /// what they need of it after Dispose.</summary>
    public sealed class Runtime : IDisposable
    {
        internal readonly RuntimeHandle Handle;

        /// <summary>Creates a runtime from runtime keys ("ep", "threads.intra", "limits.*"; null for
        /// the defaults).</summary>
        public Runtime(IDictionary<string, string> options = null)
        {
            using (OptionsHandle o = NativeOptions.Create(options))
                SpoException.Check(Native.spo_runtime_create(Native.AbiVersion, o, out Handle));
        }

        /// <summary>Creates a runtime whose log callback (as SetLog's) is set before creation, so it also
        /// receives the messages of creation itself, such as the line saying which execution providers run.
        /// Dispose removes it.</summary>
        public Runtime(IDictionary<string, string> options, LogLevel maxLevel, Action<LogLevel, string> log)
        {
            if (log == null) throw new ArgumentNullException("log");
            IntPtr id = LogRegistry.Register(log);
            try
            {
                using (OptionsHandle o = NativeOptions.Create(options))
                {
                    SpoException.Check(Native.spo_options_set_log_callback(o, LogRegistry.Trampoline, id, (int)maxLevel));
                    SpoException.Check(Native.spo_runtime_create(Native.AbiVersion, o, out Handle));
                }
            }
            catch
            {
                LogRegistry.Unregister(id);
                throw;
            }
            Handle.LogId = id;
        }

        /// <summary>The ABI version (SPO_ABI_VERSION) these bindings were written for; creating a runtime
        /// checks it against the library's.</summary>
        public const uint AbiVersion = Native.AbiVersion;

        /// <summary>The library version, "MAJOR.MINOR.PATCH".</summary>
        public static string Version { get { return Utf8.FromNative(Native.spo_version()); } }

        /// <summary>Answers "version", "ort.version", "ep.active" and the other keys of spo_runtime_info.</summary>
        public string Info(string key)
        {
            StringHandle s;
            SpoException.Check(Native.spo_runtime_info(Handle, Utf8.ToNative("key", key), out s));
            return Utf8.Take(s);
        }

        /// <summary>Loads a LoRA file (kohya/webui, diffusers/PEFT, LyCORIS).</summary>
        public Lora LoadLora(string path) { return new Lora(this, path); }

        /// <summary>Loads a diffusers/optimum ONNX model folder.</summary>
        public Pipeline LoadPipeline(string dir, IDictionary<string, string> options = null)
        {
            return new Pipeline(this, dir, options);
        }

        /// <summary>Sets (null removes) the callback receiving the runtime's messages at maxLevel and above,
        /// replacing the previous one. It may run on any thread using the runtime (ONNX Runtime's too);
        /// an exception it throws is dropped. Dispose removes it: pipelines still open log nothing more.</summary>
        public void SetLog(LogLevel maxLevel, Action<LogLevel, string> log)
        {
            bool added = false;
            try
            {
                // Held so that Dispose cannot free the runtime between the call and LogId's update.
                Handle.DangerousAddRef(ref added);
                lock (Handle)
                {
                    IntPtr id = log == null ? IntPtr.Zero : LogRegistry.Register(log);
                    try
                    {
                        SpoException.Check(Native.spo_runtime_set_log_callback(Handle, log == null ? null : LogRegistry.Trampoline, id, (int)maxLevel));
                    }
                    catch
                    {
                        LogRegistry.Unregister(id);
                        throw;
                    }
                    LogRegistry.Unregister(Handle.LogId);
                    Handle.LogId = id;
                }
            }
            finally
            {
                if (added) Handle.DangerousRelease();
            }
        }

        public void Dispose() { Handle.Dispose(); }
    }

    /// <summary>A loaded LoRA file: immutable, shareable between pipelines and threads.</summary>
    public sealed class Lora : IDisposable
    {
        internal readonly LoraHandle Handle;

        internal Lora(Runtime runtime, string path)
        {
            SpoException.Check(Native.spo_lora_load(runtime.Handle, Utf8.ToNative("path", path), out Handle));
        }

        /// <summary>Answers "format", "dialect", "modules", "rank", "alpha", "path".</summary>
        public string Info(string key)
        {
            StringHandle s;
            SpoException.Check(Native.spo_lora_info(Handle, Utf8.ToNative("key", key), out s));
            return Utf8.Take(s);
        }

        public void Dispose() { Handle.Dispose(); }
    }
}
