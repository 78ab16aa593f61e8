import CairnCore
import Foundation
import Testing

/// Our RFC 3339 arithmetic against Foundation's ISO8601DateFormatter (ICU) as the referee.
@Suite struct TimestampTests {
    private func referee(fraction: Bool) -> ISO8601DateFormatter {
        let f = ISO8601DateFormatter()
        f.formatOptions = fraction ? [.withInternetDateTime, .withFractionalSeconds] : [.withInternetDateTime]
        f.timeZone = TimeZone(identifier: "UTC")
        return f
    }

    /// Whole milliseconds in 1600..2400, leap days, century and 400-year boundaries, negative
    /// times: formatted exactly as ICU formats them, and parsed back to the same instant.
    @Test func formatsAndParsesLikeFoundation() {
        let ref = referee(fraction: true)
        var times: [Int64] = [0, -1, 1, 951_782_400_000, 951_868_799_999, 4_107_542_400_000, -2_208_988_800_000,
                              -11_644_473_600_000, 1_795_000_000_123, 253_402_300_799_999 - 86_400_000 * 400]
        var g = SystemRandomNumberGenerator()
        for _ in 0..<3000 { times.append(Int64.random(in: -11_676_096_000_000...13_569_465_600_000, using: &g)) }
        for ms in times {
            let secs = Double(ms) / 1000
            let ours = Timestamp.format(secondsSince1970: secs)
            let theirs = ref.string(from: Date(timeIntervalSince1970: secs))
            #expect(ours == theirs, "\(ms) ms")
            let back = Timestamp.parse(ours)
            #expect(back.map { abs($0 - secs) < 0.0005 } == true, "\(ours) parsed as \(String(describing: back))")
        }
    }

    @Test func outOfRangeTimesAreClampedNotTrapped() {
        #expect(Timestamp.format(secondsSince1970: .nan) == "1970-01-01T00:00:00.000Z")
        #expect(Timestamp.format(secondsSince1970: .infinity) == "9999-12-31T23:59:59.999Z")
        #expect(Timestamp.format(secondsSince1970: -.infinity) == "0000-01-01T00:00:00.000Z")
        #expect(Timestamp.format(secondsSince1970: 1e300) == "9999-12-31T23:59:59.999Z")
    }

    @Test func parsesWhatFoundationWroteAndOffsets() throws {
        let withoutFraction = referee(fraction: false)
        for s in ["2026-11-26T05:12:09Z", "2024-02-29T23:59:59Z", "1970-01-01T00:00:00Z", "2000-03-01T00:00:00Z"] {
            let expected = try #require(withoutFraction.date(from: s)).timeIntervalSince1970
            #expect(Timestamp.parse(s) == expected, "\(s)")
        }
        #expect(Timestamp.parse("2026-11-26T07:12:09.5+02:00") == Timestamp.parse("2026-11-26T05:12:09.5Z"))
        #expect(Timestamp.parse("2026-11-25T23:42:09-05:30") == Timestamp.parse("2026-11-26T05:12:09Z"))
        #expect(Timestamp.parse("2026-11-26T05:12:09.123456789Z").map { abs($0 - 1_795_669_929.123456789) < 1e-6 } == true)
        #expect(Timestamp.parse("2026-11-26t05:12:09z") == Timestamp.parse("2026-11-26T05:12:09Z"))
    }

    @Test func rejectsWhatIsNotADateTime() {
        for s in ["", "2026", "2026-11-26", "2026-11-26T05:12:09", "2026-13-01T00:00:00Z", "2026-02-29T00:00:00Z",
                  "2026-04-31T00:00:00Z", "2026-11-26T24:00:00Z", "2026-11-26T05:60:00Z", "2026-11-26T05:12:09.Z",
                  "2026-11-26T05:12:09Zjunk", "2026-11-26T05:12:09+0200", "2026-11-26 05:12:09Z", "２０２６-11-26T05:12:09Z",
                  "-026-11-26T05:12:09Z", "2026-00-10T05:12:09Z", "2026-11-00T05:12:09Z"] {
            #expect(Timestamp.parse(s) == nil, "\(s)")
        }
    }
}
