import CairnCore
import CairnTestSupport
import Foundation
import Testing

@testable import GuestFS

/// LVM2 fixtures made by the real `pvcreate`/`vgcreate`/`lvcreate` on loop devices with
/// activation off (this kernel has no device-mapper), and LVM's own reports (`pvs`, `lvs`,
/// `vgs --reportformat json`) as the referee. The images are copied before the volume group
/// is removed again; the loop devices are detached in every outcome.
final class LVMFixture: @unchecked Sendable {
    let dir: TempDir
    let vg: String
    /// Copies of the PV images, made while the volume group existed.
    var images: [String] = []
    /// "/dev/loopN" at creation -> index into `images`.
    var deviceIndex: [String: Int] = [:]
    var pvs: [[String: String]] = []
    var pvSegments: [[String: String]] = []
    var lvSegments: [[String: String]] = []
    var vgs: [[String: String]] = []
    var backupText = ""

    static let environment = ["LVM_SUPPRESS_FD_WARNINGS": "1"]

    /// `pvSizes` images (bytes), each a PV of a new VG with a unique name; then `commands`
    /// (lvm subcommands with "{vg}", "{pv0}", "{pv1}"... placeholders) run in order.
    /// `pvcreatePerPV`, when given, holds extra pvcreate arguments for each PV (one call each).
    init(_ prefix: String, pvSizes: [Int], pvcreate: [String] = [], pvcreatePerPV: [[String]]? = nil, vgcreate: [String] = [],
         commands: [[String]]) throws {
        dir = try TempDir("lvm-\(prefix)")
        vg = "cairn\(prefix)\(UInt32.random(in: 0...UInt32.max))"
        var devices: [String] = []
        var created = false
        defer {
            if created {
                _ = try? Tool.run("lvm", ["vgremove", "--devices", devices.joined(separator: ","), "--driverloaded", "n", "-f", vg],
                                  environment: Self.environment, check: false)
            }
            for d in devices { _ = try? Tool.run("losetup", ["-d", d], check: false) }
        }
        var originals: [String] = []
        for (i, size) in pvSizes.enumerated() {
            let path = dir.file("pv\(i).img")
            #expect(FileManager.default.createFile(atPath: path, contents: nil))
            try Tool.run("truncate", ["-s", "\(size)", path])
            let dev = try Tool.run("losetup", ["-f", "--show", path]).stdout.trimmingCharacters(in: .whitespacesAndNewlines)
            devices.append(dev)
            originals.append(path)
            deviceIndex[dev] = i
        }
        let devs = ["--devices", devices.joined(separator: ",")]
        func lvm(_ args: [String]) throws -> Tool.Result {
            let filled = args.map { a -> String in
                var s = a.replacingOccurrences(of: "{vg}", with: vg)
                for (i, d) in devices.enumerated() { s = s.replacingOccurrences(of: "{pv\(i)}", with: d) }
                return s
            }
            guard let cmd = filled.first else { throw CairnError(.usage, "empty lvm command") }
            return try Tool.run("lvm", [cmd] + devs + ["--driverloaded", "n"] + filled.dropFirst(), environment: Self.environment)
        }
        if let perPV = pvcreatePerPV {
            for (d, extra) in zip(devices, perPV) { _ = try lvm(["pvcreate", "-q"] + pvcreate + extra + [d]) }
        } else {
            _ = try lvm(["pvcreate", "-q"] + pvcreate + devices)
        }
        created = true
        _ = try lvm(["vgcreate", "-q"] + vgcreate + ["{vg}"] + devices)
        for c in commands { _ = try lvm(c) }

        let units = ["--units", "b", "--nosuffix", "--reportformat", "json"]
        pvs = try Self.report(lvm(["pvs", "-o", "pv_name,pv_uuid,pe_start,pv_pe_count,dev_size,pv_free,pv_pe_alloc_count,vg_name"] + units), "pv")
        pvSegments = try Self.report(lvm(["pvs", "--segments", "-o", "pv_name,pvseg_start,pvseg_size,lv_name"] + units), "pvseg")
        lvSegments = try Self.report(lvm(["lvs", "-a", "--segments", "-o",
                                           "lv_name,lv_uuid,lv_size,seg_count,segtype,seg_start_pe,seg_size_pe,stripes,stripe_size,seg_pe_ranges"] + units + ["{vg}"]), "seg")
        vgs = try Self.report(lvm(["vgs", "-o", "vg_name,vg_uuid,vg_seqno,vg_extent_size,pv_count,lv_count,vg_free"] + units + ["{vg}"]), "vg")
        let backup = dir.file("vg.backup")
        _ = try lvm(["vgcfgbackup", "-f", backup, "{vg}"])
        backupText = String(decoding: try readFile(backup), as: UTF8.self)
        for (i, p) in originals.enumerated() {
            let copy = dir.file("copy\(i).img")
            try Tool.run("cp", ["--sparse=always", p, copy])
            images.append(copy)
        }
    }

    static func report(_ r: Tool.Result, _ key: String) throws -> [[String: String]] {
        let obj = try JSONSerialization.jsonObject(with: r.stdoutData) as? [String: Any]
        let rep = (obj?["report"] as? [[String: Any]])?.first
        return rep?[key] as? [[String: String]] ?? []
    }

    var extentSize: UInt64 { UInt64(vgs.first?["vg_extent_size"] ?? "") ?? 0 }

    func peStart(device: String) -> UInt64 {
        UInt64(pvs.first { $0["pv_name"] == device }?["pe_start"] ?? "") ?? 0
    }

    /// The segments of `lv` as LVM reports them.
    func segments(of lv: String) -> [[String: String]] {
        lvSegments.filter { $0["lv_name"] == lv }.sorted { Int($0["seg_start_pe"] ?? "") ?? 0 < Int($1["seg_start_pe"] ?? "") ?? 0 }
    }

    /// "/dev/loop0:0-1 /dev/loop1:3-3" -> [(device, first, last)].
    static func ranges(_ s: String) -> [(String, UInt64, UInt64)] {
        s.split(separator: " ").compactMap { part in
            guard let colon = part.lastIndex(of: ":") else { return nil }
            let dev = String(part[..<colon])
            let nums = part[part.index(after: colon)...].split(separator: "-").compactMap { UInt64($0) }
            guard nums.count == 2 else { return nil }
            return (dev, nums[0], nums[1])
        }
    }

    /// Writes `content` as the bytes of LV `lv` straight into the image copies, placed by
    /// LVM's report (segment start, PV ranges, stripes, stripe size) and the device-mapper
    /// striping rule (chunk k on stripe k mod n, row k / n).
    func write(_ content: [UInt8], to lv: String) throws {
        let es = extentSize
        for seg in segments(of: lv) {
            let segStart = (UInt64(seg["seg_start_pe"] ?? "") ?? 0) * es
            let n = UInt64(seg["stripes"] ?? "") ?? 1
            let chunk = UInt64(seg["stripe_size"] ?? "") ?? 0
            let areas = Self.ranges(seg["seg_pe_ranges"] ?? "").map { (dev, a, _) in
                (image: images[deviceIndex[dev] ?? 0], base: peStart(device: dev) + a * es)
            }
            let length = (UInt64(seg["seg_size_pe"] ?? "") ?? 0) * es
            if n == 1 {
                try writeBytes(Array(content[Int(segStart)..<Int(segStart + length)]), to: areas[0].image, at: areas[0].base)
                continue
            }
            var k: UInt64 = 0
            while k * chunk < length {
                let a = areas[Int(k % n)]
                let from = Int(segStart + k * chunk)
                try writeBytes(Array(content[from..<from + Int(chunk)]), to: a.image, at: a.base + (k / n) * chunk)
                k += 1
            }
        }
    }

    /// The parsed PVs of the image copies.
    func physicalVolumes() throws -> [LVMPhysicalVolume] {
        try images.map { try LVMPhysicalVolume(source: FileBlockSource(path: $0)) }
    }
}

/// Test helpers that edit LVM structures in an image held in memory.
enum LVMEdit {
    static func get32(_ b: [UInt8], _ o: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(b[o + $1]) << (8 * $1) } }
    static func get64(_ b: [UInt8], _ o: Int) -> UInt64 { (0..<8).reduce(0) { $0 | UInt64(b[o + $1]) << (8 * $1) } }
    static func put32(_ v: UInt32, _ o: Int, _ b: inout [UInt8]) {
        for i in 0..<4 { b[o + i] = UInt8(truncatingIfNeeded: v >> (8 * i)) }
    }
    static func put64(_ v: UInt64, _ o: Int, _ b: inout [UInt8]) {
        for i in 0..<8 { b[o + i] = UInt8(truncatingIfNeeded: v >> (8 * i)) }
    }

    /// Offset of the first metadata area (from the PV header in the label at sector 1).
    static func firstMDA(_ b: [UInt8]) -> Int {
        let label = 512
        var pos = label + Int(get32(b, label + 20)) + 40
        while get64(b, pos) != 0 { pos += 16 }  // data areas
        return Int(get64(b, pos + 16))
    }

    /// Recomputes the first metadata area's header checksum.
    static func resealHeader(_ b: inout [UInt8], mda: Int) {
        put32(LVMChecksum.checksum(b[mda + 4..<mda + 512]), mda, &b)
    }

    /// Replaces the current metadata text of the first area with `transform(text)`, written
    /// where the old text was, with a correct size and checksum.
    static func rewriteText(_ b: inout [UInt8], _ transform: (String) -> String) {
        let mda = firstMDA(b)
        let off = Int(get64(b, mda + 40)), size = Int(get64(b, mda + 48))
        let old = String(decoding: b[mda + off..<mda + off + size - 1], as: UTF8.self)
        let new = Array(transform(old).utf8) + [0]
        b.replaceSubrange(mda + off..<mda + off + new.count, with: new)
        put64(UInt64(new.count), mda + 48, &b)
        put32(LVMChecksum.checksum(new), mda + 56, &b)
        resealHeader(&b, mda: mda)
    }
}
