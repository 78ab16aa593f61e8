/// RFC 3339 times as written into repository files (`2026-11-26T05:12:09.123Z`), formatted and
/// parsed with integer arithmetic on the proleptic Gregorian calendar.
///
/// Foundation's `ISO8601DateFormatter` did this before; on Linux it goes through ICU, whose first
/// use loads calendar and time-zone data out of a 34 MB table in the binary: measured 15-20 ms of
/// a cold `cairn restore`, spent only to stamp the lock file.
public enum Timestamp {
    /// `seconds` since 1970-01-01T00:00:00Z as `YYYY-MM-DDTHH:MM:SS.mmmZ`: milliseconds truncated
    /// toward the past after rounding to 10 microseconds; years 0000-9999 (clamped to that
    /// range; NaN is the epoch).
    public static func format(secondsSince1970 seconds: Double) -> String {
        let lowest = -62_167_219_200_000.0, highest = 253_402_300_799_999.0   // 0000-01-01, 9999-12-31
        // Rounded to 10 microseconds first: 1.775 is 1.77499999... as a Double, and is .775.
        let tens = seconds.isNaN ? 0 : (seconds * 100_000).rounded()
        let ms = Int(min(max((tens / 100).rounded(.down), lowest), highest))
        let (days, msOfDay) = floorDivide(ms, 86_400_000)
        let (y, m, d) = civil(fromDays: days)
        let h = msOfDay / 3_600_000, mi = msOfDay / 60_000 % 60, s = msOfDay / 1000 % 60, f = msOfDay % 1000
        return "\(pad(y, 4))-\(pad(m, 2))-\(pad(d, 2))T\(pad(h, 2)):\(pad(mi, 2)):\(pad(s, 2)).\(pad(f, 3))Z"
    }

    /// Seconds since 1970 of an RFC 3339 date-time: `YYYY-MM-DDTHH:MM:SS`, optional fraction
    /// (any number of digits), then `Z` or `+HH:MM` / `-HH:MM`. Nil for anything else.
    public static func parse(_ text: String) -> Double? {
        let b = Array(text.utf8)
        var i = 0
        func number(_ width: Int) -> Int? {
            guard i + width <= b.count else { return nil }
            var v: Int = 0
            for k in i..<i + width {
                guard b[k] >= 0x30, b[k] <= 0x39 else { return nil }
                v = v * 10 + Int(b[k] - 0x30)
            }
            i += width
            return v
        }
        func expect(_ c: UInt8) -> Bool {
            guard i < b.count, b[i] == c || (c >= 0x41 && c <= 0x5A && b[i] == c + 0x20) else { return false }
            i += 1
            return true
        }
        guard let y = number(4), expect(0x2D), let m = number(2), expect(0x2D), let d = number(2),
              expect(0x54), let h = number(2), expect(0x3A), let mi = number(2), expect(0x3A), let s = number(2)
        else { return nil }
        guard (1...12).contains(m), d >= 1, d <= daysInMonth(year: y, month: m), h <= 23, mi <= 59, s <= 60 else { return nil }
        var fraction = 0.0
        if i < b.count, b[i] == 0x2E {
            i += 1
            var scale = 0.1
            let start = i
            while i < b.count, b[i] >= 0x30, b[i] <= 0x39 {
                fraction += Double(b[i] - 0x30) * scale
                scale /= 10
                i += 1
            }
            guard i > start else { return nil }
        }
        var offset = 0
        if !expect(0x5A) {
            guard i < b.count, b[i] == 0x2B || b[i] == 0x2D else { return nil }
            let sign: Int = b[i] == 0x2D ? -1 : 1
            i += 1
            guard let oh = number(2), expect(0x3A), let om = number(2), oh <= 23, om <= 59 else { return nil }
            offset = sign * (oh * 3600 + om * 60)
        }
        guard i == b.count else { return nil }
        let secs = days(fromCivil: y, m, d) * 86_400 + h * 3600 + mi * 60 + s - offset
        return Double(secs) + fraction
    }

    // MARK: calendar arithmetic (days since 1970-01-01; eras of 400 years = 146097 days)

    /// Howard Hinnant's `days_from_civil`: (year, month, day) -> days since 1970-01-01.
    public static func days(fromCivil year: Int, _ month: Int, _ day: Int) -> Int {
        let y = month <= 2 ? year - 1 : year
        let era = floorDivide(y, 400).0
        let yoe = y - era * 400
        let mp = (month + 9) % 12                       // March = 0
        let doy = (153 * mp + 2) / 5 + day - 1
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy
        return era * 146_097 + doe - 719_468
    }

    /// Howard Hinnant's `civil_from_days`: days since 1970-01-01 -> (year, month, day).
    public static func civil(fromDays z: Int) -> (year: Int, month: Int, day: Int) {
        let shifted = z + 719_468
        let era = floorDivide(shifted, 146_097).0
        let doe = shifted - era * 146_097
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100)
        let mp = (5 * doy + 2) / 153
        let day = doy - (153 * mp + 2) / 5 + 1
        let month = mp < 10 ? mp + 3 : mp - 9
        return (yoe + era * 400 + (month <= 2 ? 1 : 0), month, day)
    }

    static func daysInMonth(year: Int, month: Int) -> Int {
        switch month {
        case 2: return (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 ? 29 : 28
        case 4, 6, 9, 11: return 30
        default: return 31
        }
    }

    private static func floorDivide(_ a: Int, _ b: Int) -> (Int, Int) {
        let q = a / b, r = a % b
        return r < 0 ? (q - 1, r + b) : (q, r)
    }

    private static func pad(_ v: Int, _ width: Int) -> String {
        let s = String(v)
        return s.count >= width ? s : String(repeating: "0", count: width - s.count) + s
    }
}
