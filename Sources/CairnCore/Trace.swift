#if canImport(Glibc)
import Glibc
#endif

/// Phase timings on standard error when `CAIRN_TRACE` is set: the cheapest way to see where a
/// job's wall time goes (measure before and after a hot-path change).
public enum Trace {
    public static let enabled = getenv("CAIRN_TRACE") != nil
    private static let start = now()

    private static func now() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }

    public static func mark(_ what: @autoclosure () -> String) {
        guard enabled else { return }
        var usage = rusage()
        getrusage(RUSAGE_SELF.rawValue, &usage)
        let cpu = Double(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) * 1000
            + Double(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1000
        let line = "[trace +\(Int((now() - start) * 1000)) ms, cpu \(Int(cpu)) ms] \(what())\n"
        var bytes = Array(line.utf8)
        _ = bytes.withUnsafeMutableBytes { write(2, $0.baseAddress, $0.count) }
    }
}
