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
