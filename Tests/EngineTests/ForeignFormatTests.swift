import CairnCore
import CairnTestSupport
import DiskFormats
import Engine
import Foundation
import Repository
import RepositoryFormat
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// VMware and Hyper-V disks through the whole pipeline: images made by qemu-img, backed up,
/// restored to raw and to their own format, judged by `qemu-img compare` / `check`.
@Suite("VMDK, VHD and VHDX through backup and restore")
struct ForeignFormatTests {
    struct Case: CustomTestStringConvertible, Sendable {
        var name: String
        var qemuFormat: String
        var options: String
        var testDescription: String { "\(qemuFormat) \(options)" }
    }

    static let cases: [Case] = [
        Case(name: "sparse.vmdk", qemuFormat: "vmdk", options: "subformat=monolithicSparse"),
        Case(name: "stream.vmdk", qemuFormat: "vmdk", options: "subformat=streamOptimized"),
        Case(name: "flat.vmdk", qemuFormat: "vmdk", options: "subformat=monolithicFlat"),
        Case(name: "split.vmdk", qemuFormat: "vmdk", options: "subformat=twoGbMaxExtentSparse"),
        Case(name: "dynamic.vhd", qemuFormat: "vpc", options: "subformat=dynamic,force_size=on"),
        Case(name: "fixed.vhd", qemuFormat: "vpc", options: "subformat=fixed,force_size=on"),
        Case(name: "dynamic.vhdx", qemuFormat: "vhdx", options: "subformat=dynamic,block_size=1M"),
        Case(name: "fixed.vhdx", qemuFormat: "vhdx", options: "subformat=fixed"),
    ]

    static let size = 5 * MiB + 7 * 4096 + 512

    @Test("backup of a qemu-img made image restores byte-exact to raw", arguments: cases)
    func toRaw(_ c: Case) throws {
        let dir = try TempDir("ff-raw")
        let src = dir.file("src.raw")
        try E.mixedDisk(src, size: Self.size, seed: 41)
        let image = dir.file(c.name)
        try E.qemuImg(["convert", "-q", "-f", "raw", "-O", c.qemuFormat, "-o", c.options, src, image])
        let reference = dir.file("reference.raw")
        try Tool.run("qemu-img", ["convert", "-q", "-f", c.qemuFormat, "-O", "raw", image, reference])

        let repo = try E.makeRepo(dir)
        let snap = try E.backup(repo, [.init("disk", image)])
        let d = try E.disk(snap)
        let expected: [String: String] = ["vmdk": "vmdk", "vpc": "vhd", "vhdx": "vhdx"]
        #expect(d.sourceFormat == expected[c.qemuFormat])
        let out = dir.file("restored.raw")
        try E.restore(repo, snap, to: out)
        #expect(try E.cmpEqual(reference, out), "restore of \(c.name) differs from qemu-img's reading of it")
        try #expect(CheckJob(repository: repo, readData: .all).run().ok)
    }

    @Test("restore to VMDK (streamOptimized, monolithicSparse), VHD and VHDX is read back identically by qemu-img",
          arguments: ["streamOptimized", "monolithicSparse", "vhd", "vhdx"])
    func toOwnFormat(_ target: String) throws {
        let dir = try TempDir("ff-own")
        let src = dir.file("src.raw")
        try E.mixedDisk(src, size: Self.size, seed: 42)
        let repo = try E.makeRepo(dir)
        let snap = try E.backup(repo, [.init("disk", src)])
        let d = try E.disk(snap)
        let out = dir.file("restored.\(target)")
        let file = try PosixFile(path: out, flags: O_RDWR | O_CREAT | O_EXCL)
        let sink: any BlockSink
        let qemuFormat: String
        switch target {
        case "streamOptimized": sink = try VMDKStreamOptimizedWriter(file: file, virtualSize: d.virtualSize); qemuFormat = "vmdk"
        case "monolithicSparse": sink = try VMDKSparseWriter(file: file, virtualSize: d.virtualSize); qemuFormat = "vmdk"
        case "vhd": sink = try VHDDynamicWriter(file: file, virtualSize: d.virtualSize); qemuFormat = "vpc"
        default: sink = try VHDXDynamicWriter(file: file, virtualSize: d.virtualSize); qemuFormat = "vhdx"
        }
        // Several workers: the streamOptimized writer must still get its chunks in order.
        try RestoreJob(repository: repo, snapshot: snap, disk: d, sink: sink, workers: 4).run()
        let back = dir.file("back.raw")
        try Tool.run("qemu-img", ["convert", "-q", "-f", qemuFormat, "-O", "raw", out, back])
        // A format may round the size up (VHD geometry, 512-byte sectors); the tail must be zero.
        let original = try readFile(src), restored = try readFile(back)
        #expect(restored.count >= original.count)
        #expect(Array(restored.prefix(original.count)) == original, "qemu-img reads different data from our \(target)")
        #expect(restored.dropFirst(original.count).allSatisfy { $0 == 0 })
        if qemuFormat != "vpc" {
            let check = try Tool.run("qemu-img", ["check", "-q", "-f", qemuFormat, out], check: false)
            #expect(check.status == 0, "qemu-img check: \(check.stderr)\(check.stdout)")
        }
        // And our own reader agrees.
        let reopened = try ImageOpener.open(path: out)
        #expect(reopened.format.rawValue == (qemuFormat == "vpc" ? "vhd" : qemuFormat))
    }

    @Test("a VM moved between hypervisors deduplicates against its old backups")
    func crossHypervisorDedup() throws {
        let dir = try TempDir("ff-dedup")
        let src = dir.file("src.raw")
        try E.mixedDisk(src, size: 4 * MiB, seed: 43)
        let repo = try E.makeRepo(dir)
        let q = dir.file("vm.qcow2"), v = dir.file("vm.vmdk"), h = dir.file("vm.vhdx")
        try E.qemuImg(["convert", "-q", "-f", "raw", "-O", "qcow2", src, q])
        try E.qemuImg(["convert", "-q", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", src, v])
        try E.qemuImg(["convert", "-q", "-f", "raw", "-O", "vhdx", src, h])
        let first = try E.disk(try E.backup(repo, [.init("disk", q)]))
        #expect(first.bytesNew > 0)
        for image in [v, h] {
            let again = try E.disk(try E.backup(repo, [.init("disk", image)]))
            #expect(again.bytesNew == 0, "\(image): \(again.bytesNew) new bytes for the same disk in another format")
            #expect(again.bytesDeduplicated == first.bytesNew)
        }
    }

    @Test("a VMDK descriptor naming a file outside its directory is refused")
    func hostileDescriptor() throws {
        let dir = try TempDir("ff-hostile")
        for target in ["/etc/passwd", "../outside.raw"] {
            let desc = dir.file("evil.vmdk")
            let text = """
                # Disk DescriptorFile
                version=1
                CID=fffffffe
                parentCID=ffffffff
                createType="monolithicFlat"

                RW 2048 FLAT "\(target)" 0

                ddb.virtualHWVersion = "4"
                """
            try? FileManager.default.removeItem(atPath: desc)
            try text.write(toFile: desc, atomically: true, encoding: .utf8)
            let e = #expect(throws: CairnError.self) { _ = try ImageOpener.open(path: desc) }
            #expect(e?.code == .malformedImage, "\(target): \(String(describing: e))")
            #expect(e?.description.contains(target) == true, "the error names the extent: \(String(describing: e))")
        }
    }
}
