using System;
using System.Runtime.InteropServices;
using System.Text;

namespace Spo
{
    // UTF-8 both ways by hand: netstandard2.0 has neither LPUTF8Str everywhere
    // nor Marshal.PtrToStringUTF8.
    internal static class Utf8
    {
        internal static byte[] ToNative(string what, string s)
        {
            if (s == null) throw new ArgumentNullException(what);
            if (s.IndexOf('\0') >= 0) throw new ArgumentException(what + " \"" + s.Replace("\0", "\\0") + "\" contains a NUL character", what);
            byte[] bytes = new byte[Encoding.UTF8.GetByteCount(s) + 1];
            Encoding.UTF8.GetBytes(s, 0, s.Length, bytes, 0);
            return bytes;
        }

        internal static string FromNative(IntPtr p)
        {
            if (p == IntPtr.Zero) return "";
            int n = 0;
            while (Marshal.ReadByte(p, n) != 0) n++;
            byte[] bytes = new byte[n];
            Marshal.Copy(p, bytes, 0, n);
            return Encoding.UTF8.GetString(bytes);
        }

        internal static string Take(StringHandle s)
        {
            using (s) return FromNative(s.DangerousGetHandle());
        }

    }
}
