using System;
using System.Runtime.InteropServices;

namespace Spo
{
    /// <summary>An RGB8 image copied out of the library: Height rows of Width * 3 bytes.</summary>
    public sealed class Image
    {
        public int Width;
        public int Height;
        public byte[] Rgb;

        internal static Image Copy(NativeImage v)
        {
            int w = checked((int)v.Width), h = checked((int)v.Height);
            Image img = new Image { Width = w, Height = h, Rgb = new byte[checked(w * h * 3)] };
            for (int y = 0; y < h; y++)
                Marshal.Copy(new IntPtr(v.Data.ToInt64() + (long)y * v.Stride), img.Rgb, y * w * 3, w * 3);
            return img;
        }
    }
}
