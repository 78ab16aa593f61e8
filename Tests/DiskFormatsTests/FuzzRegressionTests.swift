import CairnCore
import Foundation
import Testing
@testable import DiskFormats

/// Every input that ever crashed a fuzz target lives in fuzz/regressions/<target>/ and must now
/// open cleanly or fail with a CairnError: never trap.
@Suite("Fuzz regressions")
struct FuzzRegressionTests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("fuzz/regressions").path

    static func inputs(_ target: String) -> [String] {
        let dir = "\(root)/\(target)"
        return ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).sorted().map { "\(dir)/\($0)" }
    }

    static func open(_ target: String, _ bytes: [UInt8]) throws -> any BlockSource {
        let file = MemoryBlockSource(bytes, name: "regression")
        switch target {
        case "qcow2": return try QCOW2Image(file: file)
        case "vmdk": return try VMDKImage(file: file) { _ in MemoryBlockSource([UInt8](repeating: 0, count: 1 << 16), name: "extent") }
        case "vhd": return try VHDImage(file: file)
        default: return try VHDXImage(file: file)
        }
    }

    @Test("crash inputs found by fuzzing no longer crash", arguments: ["qcow2", "vmdk", "vhd", "vhdx"])
    func replay(_ target: String) throws {
        for path in Self.inputs(target) {
            let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
            do {
                let image = try Self.open(target, bytes)
                let extents = try image.extents(in: 0..<image.size)
                var buffer = [UInt8](repeating: 0, count: 65536)
                for e in extents.prefix(32) {
                    let n = Int(min(UInt64(buffer.count), e.length))
                    try buffer.withUnsafeMutableBytes { try image.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n]), at: e.offset) }
                }
            } catch is CairnError {
                // A clear error is the right outcome for a malformed image.
            }
        }
    }

    @Test("the regression corpus is present")
    func corpusPresent() {
        #expect(!Self.inputs("vmdk").isEmpty, "fuzz/regressions/vmdk holds the first crash found by fuzzing")
    }
}
