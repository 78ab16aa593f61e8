import CairnCore
import CairnTestSupport
import Foundation
import Testing
@testable import QEMU
#if canImport(NBDServer)
import NBDServer
#endif
#if canImport(Glibc)
import Glibc
#endif

// MARK: - Real servers

@Suite("NBD client against real servers")
struct NBDClientServerTests {
    @Test("qemu-nbd over qcow2 (data, zero clusters, unallocated): bytes equal qemu-img convert, extents equal qemu-img map")
    func qemuNBDQcow2() throws {
        let dir = try TempDir("nbdc-qcow2")
        let image = dir.file("d.qcow2")
        let size = 16 * mib
        try Tool.run("qemu-img", ["create", "-q", "-f", "qcow2", image, "\(size)"])
        try Tool.run("qemu-io", ["-f", "qcow2", image,
                                 "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 1M 64k",
                                 "-c", "write -P 0x33 3M 1M", "-c", "write -z 3584k 256k",
                                 "-c", "write -z 6M 2M", "-c", "write -P 0x44 12345678 100000",
                                 "-c", "write -P 0x55 15M 1M"])
        let raw = dir.file("d.raw")
        try Tool.run("qemu-img", ["convert", "-f", "qcow2", "-O", "raw", image, raw])
        let expected = try readFile(raw)
        let map = try qemuImgMap(image, format: "qcow2")
        #expect(map.contains { $0.kind == .unallocated } && map.contains { $0.kind == .data }, "\(map)")

        let server = try ServerProcess.qemuNBD(dir, format: "qcow2", image: image, export: "disk")
        let c = try NBDClient.connect(server.endpoint, export: "disk", timeout: 10)
        defer { c.close() }
        #expect(c.size == UInt64(size))
        #expect(c.isReadOnly)
        #expect(c.contexts == ["base:allocation"])
        #expect(c.usesStructuredReplies && c.usedGo)
        #expect(c.name == "nbd+unix:///disk?socket=\(server.socket)")

        #expect(try readMatches(c, expected, at: 0, count: size), "the whole disk in one read")
        var rng = SeededRandom(seed: 11)
        var requested = UInt64(size)
        for _ in 0..<64 {
            let offset = Int(rng.next() % UInt64(size))
            let count = Int(rng.next() % UInt64(min(size - offset, 3 * mib) + 1))
            requested += UInt64(count)
            #expect(try readMatches(c, expected, at: offset, count: count), "read of \(count) at \(offset)")
        }
        #expect(c.bytesRequested == requested)

        #expect(try c.allExtents() == map)
        for range in [UInt64(1_000_000)..<9_000_123, 3_670_016..<3_670_017, 12_345_678..<16_777_216] {
            #expect(try c.extents(in: range) == clip(map, range), "extents of \(range)")
        }
        #expect(try c.extents(in: UInt64(size)..<UInt64(size) + 10).isEmpty)
        let raw0 = try c.blockStatus(context: "base:allocation", in: 0..<UInt64(size))
        #expect(raw0.first?.range.lowerBound == 0 && raw0.last?.range.upperBound == UInt64(size))
        #expect(zip(raw0, raw0.dropFirst()).allSatisfy { $0.range.upperBound == $1.range.lowerBound && $0.flags != $1.flags })
    }

    @Test("qemu-nbd over a 10 GiB sparse qcow2: block status loops in 2 GiB requests and agrees with qemu-img map")
    func qemuNBDLargeSparse() throws {
        let dir = try TempDir("nbdc-large")
        let image = dir.file("big.qcow2")
        let size: UInt64 = 10 << 30
        try Tool.run("qemu-img", ["create", "-q", "-f", "qcow2", image, "\(size)"])
        let writes: [(UInt64, Int)] = [(0, 4096), ((3 << 30) + 12345, 70_000), ((5 << 30) - 65536, 131_072), (size - 512, 512)]
        try Tool.run("qemu-io", ["-f", "qcow2", image] + writes.flatMap { ["-c", "write -P 0x6b \($0.0) \($0.1)"] })
        let map = try qemuImgMap(image, format: "qcow2")
        let server = try ServerProcess.qemuNBD(dir, format: "qcow2", image: image, export: "big")
        let c = try NBDClient.connect(server.endpoint, export: "big", timeout: 10)
        defer { c.close() }
        #expect(c.size == size)
        #expect(try c.allExtents() == map)
        #expect(try c.extents(in: (2 << 30) - 7..<(7 << 30) + 3) == clip(map, (2 << 30) - 7..<(7 << 30) + 3))
        for (o, n) in writes {
            #expect(try c.readBytes(at: o, count: n).allSatisfy { $0 == 0x6B }, "data at \(o)")
            #expect(try c.readBytes(at: o + UInt64(n), count: min(4096, Int(size - o) - n)).allSatisfy { $0 == 0 }, "zeros after \(o)")
        }
    }

    @Test("wrong export name: a not-found error naming it and listing what the server offers")
    func wrongExportName() throws {
        let dir = try TempDir("nbdc-noexport")
        let image = dir.file("d.raw")
        _ = try randomFile(image, size: mib, seed: 1)
        let server = try ServerProcess.qemuNBD(dir, format: "raw", image: image, export: "disk")
        let e = cairnError { _ = try NBDClient.connect(server.endpoint, export: "nope", timeout: 10) }
        #expect(e?.code == .notFound)
        #expect(e?.message.contains("\"nope\"") == true, "\(String(describing: e))")
        #expect(e?.hint?.contains("\"disk\"") == true, "\(String(describing: e))")
        // The server is still fine for the right name.
        let c = try NBDClient.connect(server.endpoint, export: "disk", timeout: 10)
        #expect(c.size == UInt64(mib))
        c.close()
    }

    @Test("nbdkit file plugin with and without structured replies (--no-sr): reads equal the file; holes only with SR",
          arguments: [true, false])
    func nbdkitFile(structured: Bool) throws {
        let dir = try TempDir("nbdc-nbdkit-file")
        let path = dir.file("sparse.img")
        let size = 8 * mib
        try Tool.run("truncate", ["-s", "\(size)", path])
        var expected = [UInt8](repeating: 0, count: size)
        var rng = SeededRandom(seed: 3)
        for (offset, count) in [(0, 256 << 10), (mib, 64 << 10), (3 * mib + 4096, mib), (size - 128 << 10, 128 << 10)] {
            let b = rng.bytes(count)
            try writeBytes(b, to: path, at: UInt64(offset))
            expected.replaceSubrange(offset..<offset + count, with: b)
        }
        let server = try ServerProcess.nbdkit(dir, (structured ? [] : ["--no-sr"]) + ["file", path])
        let c = try NBDClient.connect(server.endpoint, export: "", timeout: 10)
        defer { c.close() }
        #expect(c.usesStructuredReplies == structured)
        #expect(c.contexts == (structured ? ["base:allocation"] : []))
        #expect(c.size == UInt64(size))
        #expect(try readMatches(c, expected, at: 0, count: size))
        #expect(try readMatches(c, expected, at: 123_457, count: 3 * mib + 11))
        let extents = try c.allExtents()
        if structured {
            #expect(extents == (try nbdinfoMap("nbd+unix:///?socket=\(server.socket)")))
            #expect(extents.contains { $0.kind == .unallocated }, "\(extents)")
        } else {
            #expect(extents == [Extent(offset: 0, length: UInt64(size), kind: .data)])
            let e = cairnError { _ = try c.blockStatus(context: "base:allocation", in: 0..<10) }
            #expect(e?.code == .unsupported)
        }
    }

    @Test("nbdkit data plugin behind an extent list: data, zero-only, hole+zero and hole-only map to data/zero/unallocated/data")
    func nbdkitExtentList() throws {
        let dir = try TempDir("nbdc-extentlist")
        let list = dir.file("extents")
        try "0 1M\n1M 1M zero\n2M 1M hole,zero\n3M 1M hole\n4M 512K\n".write(toFile: list, atomically: true, encoding: .utf8)
        let server = try ServerProcess.nbdkit(dir, ["-r", "--filter=extentlist", "data", "1 2 3 @0x480000 4 5 6", "size=5M", "extentlist=\(list)"])
        let c = try NBDClient.connect(server.endpoint, export: "x", timeout: 10)
        defer { c.close() }
        let m = UInt64(mib)
        #expect(try c.allExtents() == [
            Extent(offset: 0, length: m, kind: .data), Extent(offset: m, length: m, kind: .zero),
            Extent(offset: 2 * m, length: m, kind: .unallocated), Extent(offset: 3 * m, length: m + m / 2, kind: .data),
            Extent(offset: 4 * m + m / 2, length: m / 2, kind: .unallocated),
        ], "hole alone is data; the gap after the list is hole+zero")
        #expect(try c.readBytes(at: 0, count: 4) == [1, 2, 3, 0])
        #expect(try c.readBytes(at: 0x47FFFF, count: 5) == [0, 4, 5, 6, 0])
    }

    @Test("nbdkit without fixed newstyle (--mask-handshake=0): NBD_OPT_EXPORT_NAME, simple replies")
    func nbdkitPlainNewstyle() throws {
        let dir = try TempDir("nbdc-newstyle")
        let path = dir.file("d.img")
        let expected = try randomFile(path, size: 2 * mib, seed: 5)
        let server = try ServerProcess.nbdkit(dir, ["--mask-handshake=0", "file", path])
        let c = try NBDClient.connect(server.endpoint, export: "", timeout: 10)
        defer { c.close() }
        #expect(!c.usedGo && !c.usesStructuredReplies && c.contexts.isEmpty)
        #expect(c.size == UInt64(2 * mib))
        #expect(try readMatches(c, expected, at: 0, count: 2 * mib))
        #expect(try readMatches(c, expected, at: 777, count: 1))
    }

    @Test("oldstyle negotiation is refused as unsupported")
    func nbdkitOldstyle() throws {
        let dir = try TempDir("nbdc-oldstyle")
        let server = try ServerProcess.nbdkit(dir, ["-o", "memory", "1M"])
        let e = cairnError { _ = try NBDClient.connect(server.endpoint, export: "", timeout: 10) }
        #expect(e?.code == .unsupported)
        #expect(e?.message.contains("oldstyle") == true, "\(String(describing: e))")
    }

    @Test("nbdkit block size policy (minimum 4 KiB, maximum 64 KiB, misfits are errors): unaligned reads and big reads work")
    func nbdkitBlockSizePolicy() throws {
        let dir = try TempDir("nbdc-blocksize")
        let path = dir.file("d.img")
        let size = 2 * mib
        let expected = try randomFile(path, size: size, seed: 9)
        let server = try ServerProcess.nbdkit(dir, ["--filter=blocksize-policy", "file", path,
                                                    "blocksize-minimum=4096", "blocksize-preferred=65536",
                                                    "blocksize-maximum=65536", "blocksize-error-policy=error"])
        let c = try NBDClient.connect(server.endpoint, export: "", timeout: 10)
        defer { c.close() }
        #expect(c.limits == NBDBlockLimits(minimum: 4096, preferred: 65536, maximum: 65536))
        #expect(try readMatches(c, expected, at: 0, count: mib), "1 MiB becomes 16 requests")
        #expect(c.peakRequestsInFlight >= 16, "all pieces of one read are in flight together")
        #expect(try readMatches(c, expected, at: 1, count: 1))
        #expect(try readMatches(c, expected, at: 4095, count: 2))
        #expect(try readMatches(c, expected, at: 100_000, count: 300_001))
        #expect(try readMatches(c, expected, at: size - 5, count: 5))
        let map = try c.extents(in: 10..<1_000_001)
        #expect(map.first?.offset == 10 && map.last?.end == 1_000_001, "\(map)")
    }

    @Test("server errors name the errno, the export and the offset; the connection stays usable",
          arguments: ["EIO", "ENOSPC", "EINVAL", "EPERM"])
    func nbdkitErrors(errno name: String) throws {
        let dir = try TempDir("nbdc-errors")
        let server = try ServerProcess.nbdkit(dir, ["--filter=error", "memory", "4M", "error-pread=\(name)", "error-pread-rate=100%"])
        let c = try NBDClient.connect(server.endpoint, export: "vm-disk", timeout: 10)
        defer { c.close() }
        let e = cairnError { _ = try c.readBytes(at: 65536, count: 4096) }
        #expect(e?.code == .io)
        #expect(e?.message.contains(name) == true && e?.message.contains("\"vm-disk\"") == true, "\(String(describing: e))")
        #expect(e?.offset == 65536)
        #expect(e?.hint != nil)
        #expect(try c.allExtents().count >= 1, "block status still works after the failed read")
    }

    @Test("8 threads of random reads over a 64 MiB nbdkit export: every byte right, bytesRequested is the sum")
    func concurrentReads() throws {
        let dir = try TempDir("nbdc-concurrent")
        let path = dir.file("d.img")
        let size = 64 * mib
        let expected = try randomFile(path, size: size, seed: 21)
        let server = try ServerProcess.nbdkit(dir, ["--threads=8", "file", path])
        let c = try NBDClient.connect(server.endpoint, export: "", timeout: 10)
        defer { c.close() }
        let failures = Locked<[String]>([])
        let total = Locked<UInt64>(0)
        let group = DispatchGroup()
        for worker in 0..<8 {
            group.enter()
            Thread {
            defer { group.leave() }
            var rng = SeededRandom(seed: UInt64(100 + worker))
            var mine: UInt64 = 0
            for i in 0..<60 {
                // Mostly small reads; one per thread larger than the 32 MiB request limit.
                let count = i == 7 ? 40 * mib : Int(rng.next() % UInt64(512 << 10)) + 1
                let offset = Int(rng.next() % UInt64(size - count + 1))
                let view = UnsafeMutableRawBufferPointer.allocate(byteCount: count, alignment: 64)
                defer { view.deallocate() }
                do {
                    try c.read(into: view, at: UInt64(offset))
                    if !same(UnsafeRawBufferPointer(view), expected, at: offset) {
                        failures.withLock { $0.append("worker \(worker): wrong bytes at \(offset)+\(count)") }
                    }
                } catch {
                    failures.withLock { $0.append("worker \(worker): \(error)") }
                }
                mine += UInt64(count)
            }
            total.withLock { $0 += mine }
            }.start()
        }
        group.wait()
        #expect(failures.withLock { $0 }.isEmpty, "\(failures.withLock { $0 })")
        #expect(c.bytesRequested == total.withLock { $0 })
        #expect(c.peakRequestsInFlight > 1)
    }

    @Test("server killed in the middle of a read: the read fails within seconds, naming the export")
    func serverKilledMidRead() throws {
        let dir = try TempDir("nbdc-killed")
        let server = try ServerProcess.nbdkit(dir, ["--filter=delay", "memory", "8M", "rdelay=30"])
        let c = try NBDClient.connect(server.endpoint, export: "vm-disk", timeout: 30)
        defer { c.close() }
        let outcome = Locked<(any Error)?>(nil)
        let finished = DispatchSemaphore(value: 0)
        Thread {
            do { _ = try c.readBytes(at: 0, count: mib) } catch { outcome.withLock { $0 = error } }
            finished.signal()
        }.start()
        usleep(300_000)
        let killedAt = nbdNow()
        server.stop()
        #expect(finished.wait(timeout: .now() + 5) == .success, "the read returned")
        #expect(nbdNow() - killedAt < 3)
        let e = try #require(outcome.withLock { $0 } as? CairnError)
        #expect(e.code == .io)
        #expect(e.message.contains("\"vm-disk\"") && e.message.contains("closed"), "\(e)")
        let later = cairnError { _ = try c.readBytes(at: 0, count: 1) }
        #expect(later?.message.contains("no longer usable") == true, "\(String(describing: later))")
    }

    @Test("qemu-storage-daemon dirty bitmap exported over NBD: dirtyRanges are the written ranges at bitmap granularity")
    func dirtyBitmap() throws {
        let dir = try TempDir("nbdc-bitmap")
        let image = dir.file("d.qcow2")
        let size: UInt64 = 16 << 20
        try Tool.run("qemu-img", ["create", "-q", "-f", "qcow2", image, "\(size)"])
        let socket = dir.file("nbd.sock")
        let daemon = try QEMUProcess.storageDaemon(dir, [
            "--blockdev", "driver=file,filename=\(image),node-name=file0",
            "--blockdev", "driver=qcow2,file=file0,node-name=disk0",
            "--nbd-server", "addr.type=unix,addr.path=\(socket)",
        ])
        defer { daemon.stop() }
        let qmp = try daemon.connect()
        defer { qmp.close() }
        let granularity: UInt64 = 65536
        try qmp.execute("block-dirty-bitmap-add", arguments: ["node": "disk0", "name": "b0", "granularity": Int(granularity)])
        try qmp.execute("block-export-add", arguments: ["type": "nbd", "id": "rw", "node-name": "disk0", "name": "rw", "writable": true])
        let writes: [(UInt64, UInt64)] = [(100_000, 5000), (0, 4096), (1 << 20 + 10, 70_000), (5 << 20, 1 << 20),
                                          (8 << 20 - 100, 200), (size - 1, 1)]
        try Tool.run("qemu-io", ["-f", "raw", "nbd+unix:///rw?socket=\(socket)"] + writes.flatMap { ["-c", "write -P 0x5a \($0.0) \($0.1)"] })
        try qmp.execute("block-dirty-bitmap-disable", arguments: ["node": "disk0", "name": "b0"])
        try qmp.execute("block-export-add", arguments: ["type": "nbd", "id": "ro", "node-name": "disk0", "name": "ro",
                                                        "writable": false, "bitmaps": ["b0"]])

        var expected: [Range<UInt64>] = []
        for (o, l) in writes.sorted(by: { $0.0 < $1.0 }) {
            let r = o / granularity * granularity..<(o + l + granularity - 1) / granularity * granularity
            if let last = expected.last, last.upperBound >= r.lowerBound {
                expected[expected.count - 1] = last.lowerBound..<max(last.upperBound, r.upperBound)
            } else {
                expected.append(r)
            }
        }
        let c = try NBDClient.connect(.unix(socket), export: "ro",
                                      metaContexts: ["base:allocation", "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:nope"], timeout: 10)
        defer { c.close() }
        #expect(c.contexts == ["base:allocation", "qemu:dirty-bitmap:b0"])
        #expect(c.isReadOnly)
        #expect(try c.dirtyRanges(context: "qemu:dirty-bitmap:b0") == expected)
        let part: Range<UInt64> = 70_000..<(5 << 20) + 1
        let clipped = expected.compactMap { r -> Range<UInt64>? in
            let lo = max(r.lowerBound, part.lowerBound), hi = min(r.upperBound, part.upperBound)
            return lo < hi ? lo..<hi : nil
        }
        #expect(try c.dirtyRanges(context: "qemu:dirty-bitmap:b0", in: part) == clipped)
        for (o, l) in writes {
            #expect(try c.readBytes(at: o, count: Int(l)).allSatisfy { $0 == 0x5A }, "written bytes at \(o)")
        }
        #expect(try c.readBytes(at: 2 << 20, count: 4096).allSatisfy { $0 == 0 })
        let e = cairnError { _ = try c.dirtyRanges(context: "qemu:dirty-bitmap:nope") }
        #expect(e?.code == .unsupported)
        #expect(e?.message.contains("qemu:dirty-bitmap:nope") == true && e?.hint?.contains("bitmaps") == true, "\(String(describing: e))")
    }
}

#if canImport(NBDServer)
@Suite("NBD client against Cairn's own NBD server")
struct NBDClientOwnServerTests {
    static let layout: [(Range<Int>, ExtentKind)] = [
        (0..<3, .data), (3..<5, .zero), (5..<9, .data), (9..<12, .unallocated), (12..<16, .data),
    ]

    static func fixture() -> ([UInt8], [Extent]) {
        var rng = SeededRandom(seed: 31)
        var bytes = rng.bytes(16 * mib)
        for (r, kind) in layout where kind != .data { bytes.replaceSubrange(r.lowerBound * mib..<r.upperBound * mib, with: [UInt8](repeating: 0, count: r.count * mib)) }
        let extents = layout.map { Extent(offset: UInt64($0.0.lowerBound * mib), length: UInt64($0.0.count * mib), kind: $0.1) }
        return (bytes, extents)
    }

    @Test("unix and TCP: bytes, holes (OFFSET_HOLE), a 64 KiB request limit and short block status answers",
          arguments: [false, true])
    func ownServer(tcp: Bool) throws {
        let (bytes, extents) = Self.fixture()
        let server = NBDServer(exports: [NBDExport(name: "snap/disk0", source: MemoryBlockSource(bytes, name: "mem", extents: extents))],
                               options: NBDServerOptions(maxPayload: 64 << 10, maxBlockStatusDescriptors: 2))
        defer { server.shutdown() }
        let dir = try TempDir("nbdc-own")
        let endpoint: NBDEndpoint
        if tcp {
            endpoint = .tcp(host: "127.0.0.1", port: try server.listen(port: 0))
        } else {
            try server.listen(unixSocket: dir.file("nbd.sock"))
            endpoint = .unix(dir.file("nbd.sock"))
        }
        let c = try NBDClient.connect(endpoint, export: "snap/disk0", timeout: 10)
        defer { c.close() }
        #expect(c.size == UInt64(bytes.count) && c.isReadOnly && c.contexts == ["base:allocation"])
        #expect(c.limits.maximum == 64 << 10)
        #expect(try readMatches(c, bytes, at: 0, count: bytes.count))
        #expect(c.peakRequestsInFlight >= 256, "16 MiB in 64 KiB requests, all sent before waiting")
        #expect(try readMatches(c, bytes, at: 3 * mib - 10, count: 2 * mib + 20), "across the zero extent")
        // The server calls zero and unallocated extents HOLE|ZERO; two descriptors per answer make the client loop.
        let expected = extents.map { Extent(offset: $0.offset, length: $0.length, kind: $0.kind == .data ? .data : .unallocated) }.coalesced()
        #expect(try c.allExtents() == expected)
        let part = UInt64(4 * mib)..<UInt64(10 * mib + 1)
        #expect(try c.extents(in: part) == clip(expected, part))
        #expect(c.name.contains("snap/disk0"))
    }
}
#endif
