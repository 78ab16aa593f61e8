/// Human formatting and parsing of byte counts ("4 MiB", "1G", "65536").
public enum ByteCount {
    /// Binary units, one decimal: "1.5 GiB".
    public static func format(_ n: UInt64) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
        var v = Double(n)
        var i = 0
        while v >= 1024, i < units.count - 1 {
            v /= 1024
            i += 1
        }
        if i == 0 { return "\(n) B" }
        let r = (v * 10).rounded() / 10
        return "\(r) \(units[i])"
    }

    /// Parses "65536", "64K", "64KiB", "4M", "4MiB", "1G"... (binary multiples).
    public static func parse(_ text: String) -> UInt64? {
        var s = text.trimmingSpaces().uppercased()
        if s.hasSuffix("IB") { s.removeLast(2) } else if s.hasSuffix("B") { s.removeLast() }
        var mult: UInt64 = 1
        if let last = s.last, let m = ["K": UInt64(1) << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40][String(last)] {
            mult = m
            s.removeLast()
        }
        s = s.trimmingSpaces()
        guard let v = UInt64(s) else { return nil }
        let (r, o) = v.multipliedReportingOverflow(by: mult)
        return o ? nil : r
    }
}

extension String {
    func trimmingSpaces() -> String {
        var s = Substring(self)
        while s.first == " " { s.removeFirst() }
        while s.last == " " { s.removeLast() }
        return String(s)
    }
}
