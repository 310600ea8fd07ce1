// Text-to-image through the C# binding: Txt2Img.exe MODEL_DIR "prompt" OUT.ppm [LORA.safetensors]
// Build: mcs -r:SpoRuntime.dll Txt2Img.cs; run with libspo_runtime.so on LD_LIBRARY_PATH.
// Ctrl-C cancels the job through a CancellationToken.
using System;
using System.Collections.Generic;
using System.IO;
using System.Text;
using System.Threading;
using Spo;

static class Txt2Img
{
    sealed class ConsoleProgress : IProgress<JobProgress>
    {
        public void Report(JobProgress p) { Console.Error.Write("\rstep " + p.Done + "/" + p.Total); }
    }

    static int Main(string[] args)
    {
        if (args.Length < 3)
        {
            Console.Error.WriteLine("usage: Txt2Img.exe MODEL_DIR PROMPT OUT.ppm [LORA.safetensors]");
            return 2;
        }
        var cancel = new CancellationTokenSource();
        Console.CancelKeyPress += (s, e) => { e.Cancel = true; cancel.Cancel(); };
        try
        {
            using (var runtime = new Runtime())
            using (Pipeline pipeline = runtime.LoadPipeline(args[0]))
            using (Lora lora = args.Length > 3 ? runtime.LoadLora(args[3]) : null)
            {
                if (lora != null) pipeline.SetLoras(new[] { new KeyValuePair<Lora, float>(lora, 0.8f) });
                var options = new Dictionary<string, string> { { "prompt", args[1] }, { "steps", "8" }, { "seed", "42" } };
                Image image = pipeline.Generate(options, new ConsoleProgress(), cancel.Token)[0];
                Console.Error.WriteLine();
                WritePpm(args[2], image);
                Console.WriteLine("wrote " + args[2] + " (" + image.Width + "x" + image.Height + ")");
            }
            return 0;
        }
        catch (SpoException e)
        {
            Console.Error.WriteLine("\nerror " + (uint)e.Code + " (" + e.Code + "): " + e.Message);
            return 1;
        }
        catch (OperationCanceledException)
        {
            Console.Error.WriteLine("\ncancelled");
            return 1;
        }
    }

    static void WritePpm(string path, Image image)
    {
        using (var f = File.Create(path))
        {
            byte[] header = Encoding.ASCII.GetBytes("P6\n" + image.Width + " " + image.Height + "\n255\n");
            f.Write(header, 0, header.Length);
            f.Write(image.Rgb, 0, image.Rgb.Length);
        }
    }
}
