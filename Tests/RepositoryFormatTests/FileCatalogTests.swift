import CairnCore
import Testing

@testable import RepositoryFormat

@Suite("File catalog")
struct FileCatalogTests {
    @Test("round trip keeps awkward names: tabs, newlines, CR LF, backslashes, Unicode")
    func roundTrip() throws {
        let names = ["/plain", "/tab\there", "/new\nline", "/crlf\r\nname", "/back\\slash\\t", "/ünïcödé/日本", "/trailing\\"]
        let c = FileCatalog(
            volumes: [.init(name: "p1", type: "ext4", label: "root\tfs", uuid: "1234"), .init(name: "vg0/root", type: "xfs", label: "", uuid: "")],
            entries: names.enumerated().map { i, n in
                FileCatalog.Entry(volume: i % 2, kind: i % 3 == 0 ? "d" : "-", permissions: 0o4755, uid: 1000, gid: 0, size: UInt64(i) << 40,
                                  mtimeSeconds: -86_400 * Int64(i), mtimeNanoseconds: 999_999_999, path: n)
            })
        let decoded = try FileCatalog.decode(c.encode(), what: "test")
        #expect(decoded == c)
    }

    @Test("damaged catalogs are refused with the line number", arguments: [
        ("cairn-catalog 2\n", "header"),
        ("cairn-catalog 1\nF\t0\t-\t644\t0\t0\t1\t0\t0\t/x\n", "not a listed volume"),
        ("cairn-catalog 1\nV\tp1\text4\t\t\nF\t0\tZ\t644\t0\t0\t1\t0\t0\t/x\n", "line 3: unknown file kind"),
        ("cairn-catalog 1\nV\tp1\text4\t\t\nF\t0\t-\t99999\t0\t0\t1\t0\t0\t/x\n", "permissions"),
        ("cairn-catalog 1\nV\tp1\text4\t\t\nF\t0\t-\t644\t0\t0\t1\t0\t2000000000\t/x\n", "time"),
        ("cairn-catalog 1\nV\tp1\text4\t\t\nF\t0\t-\t644\t0\t0\t1\t0\t0\t/bad\\q\n", "bad escape"),
        ("cairn-catalog 1\nX\n", "unknown record"),
        ("cairn-catalog 1\nV\tp1\n", "5"),
    ])
    func damaged(_ text: String, _ expected: String) {
        #expect {
            _ = try FileCatalog.decode(Array(text.utf8), what: "test")
        } throws: { error in
            (error as? CairnError).map { $0.message.contains(expected) } ?? false
        }
    }

    @Test("invalid UTF-8 is refused")
    func notText() {
        #expect(throws: CairnError.self) { _ = try FileCatalog.decode([0x63, 0xFF, 0xFE], what: "test") }
    }
}
