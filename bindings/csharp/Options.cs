using System.Collections.Generic;

namespace Spo
{
    internal static class NativeOptions
    {
        // A C options object from key/value pairs (null: an empty one, the defaults).
        internal static OptionsHandle Create(IEnumerable<KeyValuePair<string, string>> options)
        {
            OptionsHandle o;
            SpoException.Check(Native.spo_options_create(out o));
            try
            {
                if (options != null)
                    foreach (KeyValuePair<string, string> kv in options)
                        SpoException.Check(Native.spo_options_set(o, Utf8.ToNative("option key", kv.Key), Utf8.ToNative("value of option " + kv.Key, kv.Value)));
                return o;
            }
            catch
            {
                o.Dispose();
                throw;
            }
        }
    }
}
