#if canImport(Glibc)
import Glibc
#endif

/// The host this process runs on, as written into lock records and manifests.
package func hostName() -> String {
    var buf = [UInt8](repeating: 0, count: 256)
    buf.withUnsafeMutableBufferPointer { p in
        p.baseAddress!.withMemoryRebound(to: CChar.self, capacity: 256) { _ = gethostname($0, 255) }
    }
    return String(decoding: buf.prefix(while: { $0 != 0 }), as: UTF8.self)
}

/// Who wrote a temporary file, in a form that fits a file name: `<pid>-<host tag>`, the host
/// tag being 16 hex digits of FNV-1a-64 over the host name (host names may hold dots).
///
/// A process on the same host can then tell at once that the writer is gone (its pid does not
/// exist) instead of waiting for the file to grow old.
package struct WriterTag: Equatable, Sendable {
    package var pid: Int32
    package var host: String

    package static let current = WriterTag(pid: getpid(), host: hostTag(hostName()))

    package static func hostTag(_ name: String) -> String {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for b in name.utf8 { h = (h ^ UInt64(b)) &* 0x0000_0100_0000_01b3 }
        let hex = String(h, radix: 16)
        return String(repeating: "0", count: 16 - hex.count) + hex
    }

    package var text: String { "\(pid)-\(host)" }

    package init(pid: Int32, host: String) {
        self.pid = pid
        self.host = host
    }

    /// Parses `text`; nil for anything else (an older name, a random number).
    package init?(_ text: Substring) {
        let parts = text.split(separator: "-", omittingEmptySubsequences: false)
        guard parts.count == 2, let pid = Int32(parts[0]), pid > 0, parts[1].count == 16,
              parts[1].allSatisfy({ $0.isHexDigit }) else { return nil }
        self.init(pid: pid, host: String(parts[1]))
    }

    /// True only when the writer certainly no longer runs: it was on this host and its pid is
    /// gone. (A reused pid only delays the cleanup.)
    package var isDeadWriterOnThisHost: Bool {
        guard host == WriterTag.current.host, pid != WriterTag.current.pid else { return false }
        return kill(pid, 0) != 0 && errno == ESRCH
    }
}
