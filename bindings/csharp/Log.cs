using System;
using System.Collections.Generic;
using System.Runtime.InteropServices;

namespace Spo
{
    /// <summary>Log levels (spo_log_level), most severe first: a callback set at Info also receives
    /// warnings and errors.</summary>
    public enum LogLevel
    {
        Error = 1,
        Warn = 2,
        Info = 3,
        Debug = 4,
    }

    // The runtimes' log callbacks. Native code holds one static delegate
    // (never collected) and an id as user_data; the id names the managed
    // callback here. The library may still deliver a message it read just
    // before its callback was replaced, so a missing id drops the message
    // instead of calling into a collected delegate.
    internal static class LogRegistry
    {
        private static readonly object Gate = new object();
        private static readonly Dictionary<IntPtr, Action<LogLevel, string>> Sinks = new Dictionary<IntPtr, Action<LogLevel, string>>();
        private static long next;

        internal static readonly NativeLog Trampoline = Deliver;

        internal static IntPtr Register(Action<LogLevel, string> log)
        {
            lock (Gate)
            {
                IntPtr id = new IntPtr(++next);
                Sinks[id] = log;
                return id;
            }
        }

        internal static void Unregister(IntPtr id)
        {
            lock (Gate) Sinks.Remove(id);
        }

        private static void Deliver(IntPtr userData, int level, IntPtr message)
        {
            Action<LogLevel, string> log;
            lock (Gate)
                if (!Sinks.TryGetValue(userData, out log)) return;
            try
            {
                log((LogLevel)level, Utf8.FromNative(message));
            }
            catch (Exception)
            {
                // Never unwind through the library's native frames; there is no
                // caller to hand the exception to, so the message is dropped.
            }
        }
    }
}
