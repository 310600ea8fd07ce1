using System;

namespace Spo
{
    /// <summary>The stable error codes of the C API (spo_code).</summary>
    public enum SpoCode : uint
    {
        Ok = 0,
        InvalidArgument = 1,
        NullArgument = 2,
        InvalidUtf8 = 3,
        UnknownOption = 4,
        InvalidOptionValue = 5,
        AbiMismatch = 6,
        OrtLoad = 10,
        Ort = 11,
        EpUnavailable = 12,
        Io = 20,
        InvalidModel = 21,
        InvalidLora = 22,
        InvalidFile = 23,
        Busy = 30,
        Cancelled = 31,
        Unsupported = 40,
        OutOfMemory = 50,
        Panic = 99,
    }

    /// <summary>An error of the library: its stable code and its message, which names the file, key,
    /// shape or value at fault.</summary>
    public sealed class SpoException : Exception
    {
        public SpoCode Code { get; private set; }

        public SpoException(SpoCode code, string message) : base(message) { Code = code; }

        // Throws (after freeing it) the error a call returned; a null handle is success.
        internal static void Check(ErrorHandle error)
        {
            using (error)
            {
                if (error.IsInvalid) return;
                throw new SpoException((SpoCode)Native.spo_error_code(error), Utf8.FromNative(Native.spo_error_message(error)));
            }
        }
    }
}
