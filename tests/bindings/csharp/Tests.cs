// Tests of the C# binding, run by `make csharp-test`: Tests.exe REPO_ROOT CASE.txt REF_DIR
// (the last two relative to REPO_ROOT). The references are independent of the
// binding: ref.rgb and ref-lora.rgb are what tests/bindings/reference.c makes of
// the case file through the C API alone, and the code values come from the C header.
using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using System.Runtime.CompilerServices;
using System.Text.RegularExpressions;
using System.Threading;
using Spo;

static class Tests
{
    static int checks, failures;
    static string root, refDir, model, loraFile;
    static float loraMultiplier;
    static readonly Dictionary<string, string> caseJob = new Dictionary<string, string>();

    static void Check(bool ok, string what)
    {
        checks++;
        if (!ok) { failures++; Console.Error.WriteLine("FAIL " + what); }
    }

    // tests/bindings/case.txt: KEY=VALUE lines, job.KEY for the job options.
    static void ReadCase(string path)
    {
        foreach (string line in File.ReadAllLines(path))
        {
            if (line.StartsWith("#") || line.Length == 0) continue;
            int eq = line.IndexOf('=');
            if (eq < 0) throw new InvalidDataException(path + ": line without '=': " + line);
            string key = line.Substring(0, eq), value = line.Substring(eq + 1);
            if (key.StartsWith("job.")) caseJob[key.Substring(4)] = value;
            else if (key == "model") model = Path.Combine(root, value);
            else if (key == "lora") loraFile = Path.Combine(root, value);
            else if (key == "lora_multiplier") loraMultiplier = float.Parse(value, System.Globalization.CultureInfo.InvariantCulture);
        }
    }

    // The case's job options, with pairs of (key, value) replaced.
    static Dictionary<string, string> JobOptions(params string[] replace)
    {
        var options = new Dictionary<string, string>(caseJob);
        for (int i = 0; i + 1 < replace.Length; i += 2) options[replace[i]] = replace[i + 1];
        return options;
    }

    static int CaseInt(string key) { return int.Parse(caseJob[key]); }

    static byte[] Reference(string name) { return File.ReadAllBytes(Path.Combine(refDir, name)); }

    static byte[] Generate(Pipeline pipe, params string[] replace)
    {
        Image[] images = pipe.Generate(JobOptions(replace));
        Check(images.Length == 1 && images[0].Width == CaseInt("width") && images[0].Height == CaseInt("height"), "one image of the case's size");
        return images[0].Rgb;
    }

    static void ExpectCode(Action action, SpoCode code, string needle, string what)
    {
        try
        {
            action();
            Check(false, what + ": no exception, wanted " + code);
        }
        catch (SpoException e)
        {
            Check(e.Code == code && e.Message.Contains(needle), what + ": got " + e.Code + " '" + e.Message + "', wanted " + code + " with '" + needle + "'");
        }
    }

    // A synchronous IProgress (Progress<T> would post to the thread pool).
    sealed class Callback : IProgress<JobProgress>
    {
        readonly Action<JobProgress> action;
        public Callback(Action<JobProgress> action) { this.action = action; }
        public void Report(JobProgress p) { action(p); }
    }

    static string PascalCase(string upper)
    {
        return string.Concat(upper.Split('_').Select(w => w.Substring(0, 1) + w.Substring(1).ToLowerInvariant()));
    }

    static void HeaderValues()
    {
        string header = File.ReadAllText(Path.Combine(root, "include/spo_runtime.h"));
        MatchCollection codes = Regex.Matches(header, @"SPO_(OK|ERR_\w+) = (\d+),");
        Check(codes.Count == Enum.GetValues(typeof(SpoCode)).Length, "every spo_code has an SpoCode (" + codes.Count + ")");
        foreach (Match m in codes)
        {
            string name = PascalCase(m.Groups[1].Value.Replace("ERR_", ""));
            Check(Enum.IsDefined(typeof(SpoCode), name) && (uint)Enum.Parse(typeof(SpoCode), name) == uint.Parse(m.Groups[2].Value), "SpoCode." + name + " = " + m.Groups[2].Value);
        }
        foreach (Match m in Regex.Matches(header, @"SPO_LORA_(\w+) = (\d+),"))
            Check((int)Enum.Parse(typeof(LoraMode), PascalCase(m.Groups[1].Value)) == int.Parse(m.Groups[2].Value), "LoraMode." + m.Groups[1].Value);
        Match abi = Regex.Match(header, @"#define SPO_ABI_VERSION (\d+)");
        Check(abi.Success && uint.Parse(abi.Groups[1].Value) == Runtime.AbiVersion, "AbiVersion matches the header");
    }

    static void GenerateMatchesC(Pipeline pipe)
    {
        int calls = 0;
        Image[] images = pipe.Generate(JobOptions(), new Callback(p => {
            calls++;
            Check(p.Done == calls && p.Total == CaseInt("steps"), "progress " + p.Done + "/" + p.Total);
        }));
        Check(calls == CaseInt("steps"), "progress called once a step, got " + calls);
        Check(images[0].Rgb.SequenceEqual(Reference("ref.rgb")), "image equals the C API's for the same seed");
        Check(!Generate(pipe, "seed", "8").SequenceEqual(images[0].Rgb), "another seed gives another image");
        using (Job job = pipe.CreateJob(JobOptions()))
        {
            JobStatus s;
            int steps = 0;
            do
            {
                s = job.Step();
                steps++;
                Preview p = job.Preview();
                // SDXL latents: 4 channels at 1/8 of the image size.
                int[] shape = { 1, 4, CaseInt("height") / 8, CaseInt("width") / 8 };
                Check(p.Step == s.Done && p.Shape.SequenceEqual(shape) && p.Latents.Length == shape[1] * shape[2] * shape[3], "preview after step " + s.Done);
            } while (!s.Finished);
            Check(steps == CaseInt("steps"), "one Step a step, got " + steps);
            Check(job.TakeImages()[0].Rgb.SequenceEqual(Reference("ref.rgb")), "stepped image equals the C API's");
        }
    }

    static void Errors(Runtime rt, Pipeline pipe)
    {
        ExpectCode(() => pipe.CreateJob(JobOptions("stepz", "4")), SpoCode.UnknownOption, "stepz", "unknown job key");
        ExpectCode(() => pipe.CreateJob(JobOptions("width", "100000")), SpoCode.InvalidOptionValue, "limits.max_side", "width over the limit");
        ExpectCode(() => rt.LoadPipeline(Path.Combine(root, "no/such/model")), SpoCode.InvalidModel, "no/such/model", "missing model");
        ExpectCode(() => rt.LoadLora("/no/such.safetensors"), SpoCode.Io, "/no/such.safetensors", "missing LoRA");
        ExpectCode(() => pipe.Info("nonsense"), SpoCode.InvalidArgument, "nonsense", "unknown info key");
        try { rt.Info("a\0b"); Check(false, "NUL in a key accepted"); }
        catch (ArgumentException e) { Check(e.Message.Contains("NUL"), "NUL refused: " + e.Message); }
        Check(pipe.Info("kind") == "sdxl", "kind is sdxl");
        Check(Generate(pipe).SequenceEqual(Reference("ref.rgb")), "image after errors equals the C API's");
        Lora lora = rt.LoadLora(loraFile);
        lora.Dispose();
        lora.Dispose();
        try { lora.Info("format"); Check(false, "a disposed LoRA answered"); }
        catch (ObjectDisposedException) { }
    }

    static void CancelThenReuse(Pipeline pipe)
    {
        var options = JobOptions("steps", "200");
        uint last = 0;
        using (var started = new ManualResetEventSlim())
        using (var cancelled = new ManualResetEventSlim())
        using (Job job = pipe.CreateJob(options))
        {
            job.SetProgress(new Callback(p => {
                last = p.Done;
                if (p.Done == 1) { started.Set(); cancelled.Wait(); }
            }));
            var canceller = new Thread(() => { started.Wait(); job.Cancel(); cancelled.Set(); });
            canceller.Start();
            ExpectCode(() => job.Run(), SpoCode.Cancelled, "", "cancel from another thread");
            canceller.Join();
            Check(last == 1, "no step after the cancel, got " + last);
            Check(Generate(pipe).SequenceEqual(Reference("ref.rgb")), "image after a cancel equals the C API's");
        }
        using (var source = new CancellationTokenSource())
        {
            last = 0;
            try
            {
                pipe.Generate(options, new Callback(p => { last = p.Done; if (p.Done == 1) source.Cancel(); }), source.Token);
                Check(false, "a cancelled token let the job finish");
            }
            catch (OperationCanceledException e)
            {
                var inner = e.InnerException as SpoException;
                Check(inner != null && inner.Code == SpoCode.Cancelled && e.CancellationToken == source.Token, "token cancel: " + e);
            }
            Check(last < 200, "token cancel stopped the job at " + last);
        }
        try
        {
            pipe.Generate(JobOptions(), new Callback(p => { throw new InvalidOperationException("boom"); }));
            Check(false, "a throwing progress callback was swallowed");
        }
        catch (InvalidOperationException e) { Check(e.Message == "boom", "callback exception rethrown"); }
        Check(Generate(pipe).SequenceEqual(Reference("ref.rgb")), "image after cancels equals the C API's");
    }

    static void Loras(Runtime rt, Pipeline pipe)
    {
        using (Lora lora = rt.LoadLora(loraFile))
        {
            Check(lora.Info("format") != "", "LoRA format");
            pipe.SetLoras(new[] { new KeyValuePair<Lora, float>(lora, loraMultiplier) }, LoraMode.Merge);
            byte[] with = Generate(pipe);
            Check(with.SequenceEqual(Reference("ref-lora.rgb")), "image with the LoRA equals the C API's");
            Check(!with.SequenceEqual(Reference("ref.rgb")), "the LoRA changes the image");
        }
        pipe.SetLoras(new KeyValuePair<Lora, float>[0], LoraMode.Merge);
        Check(Generate(pipe).SequenceEqual(Reference("ref.rgb")), "image after removing the LoRA equals the C API's");
    }

    static Job CreateJobAfterGC(Pipeline pipe)
    {
        for (int tries = 0; ; tries++)
        {
            try { return pipe.CreateJob(JobOptions()); }
            catch (SpoException e)
            {
                if (e.Code != SpoCode.Busy || tries > 100) throw;
                GC.Collect();
                GC.WaitForPendingFinalizers();
            }
        }
    }

    // Its own frame, so no stale stack slot keeps the dropped handles reachable
    // for Mono's conservative stack scan.
    [MethodImpl(MethodImplOptions.NoInlining)]
    static void DropHandles(Runtime rt, Pipeline pipe, int i)
    {
        rt.LoadLora(loraFile);
        Job job = CreateJobAfterGC(pipe);
        if (i % 10 == 0) { job.SetProgress(new Callback(p => { })); job.Step(); }
    }

    static void Collect()
    {
        for (int i = 0; i < 3; i++) { GC.Collect(); GC.WaitForPendingFinalizers(); }
    }

    [MethodImpl(MethodImplOptions.NoInlining)]
    static void SetCollectingProgress(Job job, Action onStep)
    {
        job.SetProgress(new Callback(p => { onStep(); Collect(); }));
    }

    static void GcStress(Runtime rt, Pipeline pipe)
    {
        // The delegate handed to native code must survive collections, before
        // the run and during it, for as long as the job may call it.
        using (Job job = pipe.CreateJob(JobOptions()))
        {
            int calls = 0;
            SetCollectingProgress(job, () => calls++);
            Collect();
            job.Run();
            Check(calls == CaseInt("steps"), "progress with GC called once a step, got " + calls);
            Check(job.TakeImages()[0].Rgb.SequenceEqual(Reference("ref.rgb")), "image with GC in the callback equals the C API's");
        }
        // Handles dropped without Dispose are freed by finalizers: a dropped job
        // frees the pipeline's job slot once collected.
        for (int i = 0; i < 100; i++) DropHandles(rt, pipe, i);
        using (Job job = CreateJobAfterGC(pipe))
        {
            job.Run();
            Check(job.TakeImages()[0].Rgb.SequenceEqual(Reference("ref.rgb")), "image after the GC loop equals the C API's");
        }
    }

    static void Threads(Runtime rt)
    {
        byte[] want = Reference("ref.rgb");
        var threads = Enumerable.Range(0, 2).Select(t => new Thread(() => {
            try
            {
                using (Pipeline own = rt.LoadPipeline(model))
                    for (int i = 0; i < 2; i++)
                        Check(own.Generate(JobOptions(), new Callback(p => { }))[0].Rgb.SequenceEqual(want), "thread " + t + " run " + i);
            }
            catch (Exception e) { Check(false, "thread " + t + ": " + e); }
        })).ToList();
        threads.ForEach(t => t.Start());
        threads.ForEach(t => t.Join());
    }

    // The trainer on the tiny SD 1.5 fixture with the toy colour preference model, at the
    // settings of tests/c/trainer.c (3 DDIM steps, pools of 2) so a round takes seconds.
    static Dictionary<string, string> TrainerOptions(string dir)
    {
        return new Dictionary<string, string> {
            { "train.dir", dir }, { "train.preference", Path.Combine(root, "tests/fixtures/preference/colour") },
            { "train.preset", "toy" }, { "train.steps", "3" }, { "train.divert_start", "1" }, { "train.pool", "2" },
            { "train.threshold", "0" },
        };
    }

    static string Sd15 { get { return Path.Combine(root, "tests/fixtures/tiny-sd15"); } }
    static string TrainDir { get { return Path.Combine(root, "tests/fixtures/train/tiny-sd15/graphs"); } }

    static bool Finite(double v) { return !double.IsNaN(v) && !double.IsInfinity(v); }

    static void CheckMetrics(TrainMetrics m, string what)
    {
        Check(Finite(m.Loss) && Finite(m.ScoreMean) && Finite(m.ScoreGap) && Finite(m.GradNorm) && Finite(m.AcceptedRatio),
              what + ": finite metrics, got loss " + m.Loss + " score " + m.ScoreMean + " grad " + m.GradNorm);
    }

    static void TrainRoundSaveLoadApply(Runtime rt, Pipeline pipe)
    {
        string dir = Path.Combine(Path.GetTempPath(), "spo-csharp-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(dir);
        try
        {
            using (Trainer tr = pipe.CreateTrainer(TrainerOptions(TrainDir)))
            {
                int calls = 0;
                tr.SetProgress(new Callback(p => { calls++; Check(p.Done <= p.Total, "progress " + p.Done + "/" + p.Total); }));
                TrainMetrics m = tr.Step(new[] { "a red apple", "a blue car" });
                CheckMetrics(m, "round 0");
                // 2 prompts x one segment (steps 1-2; the last step opens no pool).
                Check(m.Round == 0 && m.Pools == 2 && m.Pairs > 0 && m.Updates > 0 && m.TimeBackward > 0 && calls > 0,
                      "round 0: round " + m.Round + " pools " + m.Pools + " pairs " + m.Pairs + " updates " + m.Updates + " calls " + calls);
                // The dialects spo_lora_info reports for the two formats.
                foreach (var f in new Dictionary<string, string> { { "webui", "Kohya" }, { "diffusers", "Peft" } })
                {
                    string path = Path.Combine(dir, f.Key + ".safetensors");
                    tr.SaveLora(path, f.Key);
                    Check(File.Exists(path) && new FileInfo(path).Length > 0, "saved LoRA " + path);
                    using (Lora lora = rt.LoadLora(path))
                    {
                        Check(lora.Info("format") == f.Value, f.Key + " LoRA format: " + lora.Info("format"));
                        pipe.SetLoras(new[] { new KeyValuePair<Lora, float>(lora, 1f) });
                    }
                }
                // Back to a checkpoint: the same round again, bit for bit.
                string ckpt = Path.Combine(dir, "trainer.ckpt");
                tr.SaveCheckpoint(ckpt);
                TrainMetrics a = tr.Step(new[] { "a red apple" });
                tr.LoadCheckpoint(ckpt);
                TrainMetrics b = tr.Step(new[] { "a red apple" });
                Check(a.Round == 1 && b.Round == 1 && a.Loss == b.Loss && a.GradNorm == b.GradNorm,
                      "round after the checkpoint twice: " + a.Loss + " " + b.Loss);
                tr.Apply(pipe);
                Check(pipe.Generate(new Dictionary<string, string> { { "prompt", "a red apple" }, { "steps", "2" } }).Length == 1,
                      "a job with the applied LoRA");
            }
        }
        finally { Directory.Delete(dir, true); }
    }

    static void TrainErrors(Pipeline pipe)
    {
        try
        {
            pipe.CreateTrainer(TrainerOptions(Path.Combine(root, "tests/fixtures/train/no-such-folder")));
            Check(false, "a missing training folder was accepted");
        }
        catch (SpoException e)
        {
            // The library's own error, naming the folder.
            Check(e.Code != SpoCode.Ok && e.Message.Contains("no-such-folder"), "missing training folder: " + e.Code + " " + e.Message);
        }
        ExpectCode(() => pipe.CreateTrainer(new Dictionary<string, string> { { "train.lrr", "1" } }), SpoCode.UnknownOption, "train.lrr", "unknown trainer key");
        Trainer tr = pipe.CreateTrainer(TrainerOptions(TrainDir));
        ExpectCode(() => tr.SaveLora(Path.Combine(Path.GetTempPath(), "x.safetensors"), "ckpt"), SpoCode.InvalidArgument, "ckpt", "bad format");
        ExpectCode(() => tr.LoadCheckpoint(Path.Combine(Sd15, "unet/config.json")), SpoCode.InvalidFile, "config.json", "not a checkpoint");
        ExpectCode(() => tr.Step(new string[0]), SpoCode.InvalidArgument, "0 prompts", "no prompts");
        tr.Dispose();
        tr.Dispose(); // a second Dispose is a no-op
        try { tr.Step(new[] { "a red apple" }); Check(false, "a disposed trainer stepped"); }
        catch (ObjectDisposedException) { }
    }

    // Cancel from another thread while the round samples: Step throws Cancelled, the round
    // does not count, and the trainer trains on.
    static void TrainCancel(Pipeline pipe)
    {
        using (Trainer tr = pipe.CreateTrainer(TrainerOptions(TrainDir)))
        {
            using (var started = new ManualResetEventSlim())
            using (var cancelled = new ManualResetEventSlim())
            {
                tr.SetProgress(new Callback(p => { if (!started.IsSet) { started.Set(); cancelled.Wait(); } }));
                var canceller = new Thread(() => { started.Wait(); tr.Cancel(); cancelled.Set(); });
                canceller.Start();
                ExpectCode(() => tr.Step(new[] { "a red apple" }), SpoCode.Cancelled, "", "trainer cancel from another thread");
                canceller.Join();
            }
            using (var source = new CancellationTokenSource())
            {
                tr.SetProgress(new Callback(p => source.Cancel()));
                try
                {
                    tr.Step(new[] { "a red apple" }, source.Token);
                    Check(false, "a cancelled token let the round finish");
                }
                catch (OperationCanceledException e)
                {
                    var inner = e.InnerException as SpoException;
                    Check(inner != null && inner.Code == SpoCode.Cancelled, "trainer token cancel: " + e);
                }
            }
            tr.SetProgress(null);
            TrainMetrics m = tr.Step(new[] { "a red apple" });
            Check(m.Round == 0, "round " + m.Round + " after two cancelled rounds, want 0");
            CheckMetrics(m, "round after cancels");
        }
    }

    // Loading a pipeline logs "loaded sd15 pipeline from DIR" at info level.
    static void LogCallback()
    {
        var records = new List<KeyValuePair<LogLevel, string>>();
        Action<LogLevel, string> log = (level, message) => { lock (records) records.Add(new KeyValuePair<LogLevel, string>(level, message)); };
        Func<List<KeyValuePair<LogLevel, string>>> take = () => { lock (records) { var r = records.ToList(); records.Clear(); return r; } };
        using (var rt = new Runtime(new Dictionary<string, string> { { "ep", "cpu" } }))
        {
            rt.SetLog(LogLevel.Debug, log);
            Collect(); // the callback must survive collections
            rt.LoadPipeline(Sd15).Dispose();
            var got = take();
            Check(got.All(r => r.Key >= LogLevel.Error && r.Key <= LogLevel.Debug), "log levels in range");
            Check(got.Any(r => r.Key == LogLevel.Info && r.Value.Contains("loaded sd15 pipeline from") && r.Value.Contains("tiny-sd15")),
                  "info message about the pipeline load, got " + got.Count + " messages");
            rt.SetLog(LogLevel.Error, log);
            rt.LoadPipeline(Sd15).Dispose();
            Check(take().Count == 0, "no messages at error level");
            rt.SetLog(LogLevel.Info, null);
            rt.LoadPipeline(Sd15).Dispose();
            Check(take().Count == 0, "no messages after removing the callback");
            ExpectCode(() => rt.SetLog((LogLevel)9, log), SpoCode.InvalidArgument, "9", "bad log level");
            // A throwing callback is dropped, never unwound through native code.
            rt.SetLog(LogLevel.Info, (level, message) => { throw new InvalidOperationException("boom"); });
            rt.LoadPipeline(Sd15).Dispose();
        }
        // A callback given at creation receives creation's own messages: the line naming the
        // execution providers, which SetLog comes too late for.
        using (var rt = new Runtime(new Dictionary<string, string> { { "ep", "cpu" } }, LogLevel.Info, log))
        {
            var got = take().Where(r => r.Value.Contains("execution providers")).ToList();
            Check(got.Count == 1 && got[0].Key == LogLevel.Info && got[0].Value.Contains("execution providers: cpu"),
                  "the providers line from creation, got " + got.Count);
        }
        ExpectCode(() => new Runtime(null, (LogLevel)9, log), SpoCode.InvalidArgument, "9", "bad log level at creation");
        // Runtimes and trainers dropped without Dispose are freed by finalizers.
        for (int i = 0; i < 3; i++) DropLoggingRuntime(log);
        Collect();
    }

    [MethodImpl(MethodImplOptions.NoInlining)]
    static void DropLoggingRuntime(Action<LogLevel, string> log)
    {
        var rt = new Runtime(new Dictionary<string, string> { { "ep", "cpu" } });
        rt.SetLog(LogLevel.Debug, log);
        Pipeline pipe = rt.LoadPipeline(Sd15);
        pipe.CreateTrainer(TrainerOptions(TrainDir)).SetProgress(new Callback(p => { }));
    }

    static void Training()
    {
        using (var rt = new Runtime(new Dictionary<string, string> { { "ep", "cpu" } }))
        using (Pipeline pipe = rt.LoadPipeline(Sd15))
        {
            TrainRoundSaveLoadApply(rt, pipe);
            TrainErrors(pipe);
            TrainCancel(pipe);
            TrainUpdate(pipe);
        }
    }

    // Pairs from the host's own sampler, as tests/c/trainer.c sends them: one update, then the
    // library's named refusals and this binding's length check.
    static void TrainUpdate(Pipeline pipe)
    {
        using (Trainer tr = pipe.CreateTrainer(TrainerOptions(TrainDir)))
        {
            uint[] shape = tr.LatentShape();
            Check(shape.Length == 4 && shape[0] == 1 && shape[1] == 4 && shape[2] == 8 && shape[3] == 8,
                  "latent shape " + string.Join(",", shape));
            int n = (int)(shape[0] * shape[1] * shape[2] * shape[3]);
            var x = new float[4][];
            for (int k = 0; k < 4; k++)
            {
                x[k] = new float[n];
                for (int i = 0; i < n; i++) x[k][i] = (float)(((k * n + i) * 37) % 19) / 19.0f - 0.5f;
            }
            Func<TrainPair> pair = () => new TrainPair { Timestep = 334, XtWin = x[0], XPrevWin = x[1], XtLose = x[2], XPrevLose = x[3] };
            var prompts = new[] { "a green field" };
            TrainMetrics m = tr.Update(prompts, new[] { pair() });
            Check(m.Pairs == 1 && m.Updates + m.SkippedUpdates == 1 && m.Pools == 0,
                  "update metrics: pairs " + m.Pairs + ", updates " + m.Updates + ", pools " + m.Pools);
            TrainPair bad = pair();
            bad.Timestep = 500;
            ExpectCode(() => tr.Update(prompts, new[] { bad }), SpoCode.InvalidArgument, "schedule", "timestep off the schedule");
            bad = pair();
            bad.Prompt = 3;
            ExpectCode(() => tr.Update(prompts, new[] { bad }), SpoCode.InvalidArgument, "prompt 3", "prompt index");
            bad = pair();
            bad.XPrevLose = new float[n - 1];
            try
            {
                tr.Update(prompts, new[] { pair(), bad });
                Check(false, "a short latent was accepted");
            }
            catch (ArgumentException e)
            {
                Check(e.Message.Contains("pair 1: XPrevLose has 255 floats, expected 256"), "short latent: " + e.Message);
            }
        }
    }

    static int Main(string[] args)
    {
        root = args[0];
        ReadCase(Path.Combine(root, args[1]));
        refDir = Path.Combine(root, args[2]);
        HeaderValues();
        using (var rt = new Runtime(new Dictionary<string, string> { { "ep", "cpu" } }))
        using (Pipeline pipe = rt.LoadPipeline(model))
        {
            var tests = new List<KeyValuePair<string, Action>> {
                new KeyValuePair<string, Action>("generate", () => GenerateMatchesC(pipe)),
                new KeyValuePair<string, Action>("errors", () => Errors(rt, pipe)),
                new KeyValuePair<string, Action>("cancel", () => CancelThenReuse(pipe)),
                new KeyValuePair<string, Action>("lora", () => Loras(rt, pipe)),
                new KeyValuePair<string, Action>("gc", () => GcStress(rt, pipe)),
                new KeyValuePair<string, Action>("threads", () => Threads(rt)),
                new KeyValuePair<string, Action>("trainer", Training),
                new KeyValuePair<string, Action>("log", LogCallback),
            };
            foreach (var t in tests)
            {
                try { t.Value(); }
                catch (Exception e) { Check(false, t.Key + " threw " + e); }
                Console.WriteLine(t.Key + ": done");
            }
        }
        Console.WriteLine("csharp: " + (checks - failures) + " passed, " + failures + " failed");
        return failures == 0 ? 0 : 1;
    }
}
