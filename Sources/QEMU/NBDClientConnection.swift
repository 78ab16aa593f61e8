// The NBD client's transmission phase: requests in flight, the reply reader that dispatches
// replies by cookie, and failing every waiter on a protocol violation (docs/NBD-CLIENT.md).
import CairnCore
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Why a request failed.
enum NBDRequestFailure: Equatable, Sendable {
    /// The server answered with an error.
    case server(code: UInt32, message: String, offset: UInt64?)
    /// The connection broke (or was closed) before the reply was complete.
    case connection(String)
}

/// One request in flight. The reader thread owns its reply state until `isDone`; the caller
/// looks at it only afterwards (both under the connection's lock, which orders the accesses).
final class NBDClientRequest: @unchecked Sendable {
    let type: UInt16
    let offset: UInt64
    let length: UInt32
    /// Where a READ's bytes go (nil for BLOCK_STATUS).
    let buffer: UnsafeMutableRawBufferPointer?
    var cookie: UInt64 = 0
    // Written by the reader while in flight.
    var assembly: NBDReadAssembly
    var statuses: [UInt32: [NBDDescriptor]] = [:]
    var serverError: NBDRequestFailure?
    // Guarded by the connection's lock.
    var isDone = false
    var failure: NBDRequestFailure?

    init(read buffer: UnsafeMutableRawBufferPointer, offset: UInt64) {
        type = NBDCommand.read
        self.offset = offset
        length = UInt32(buffer.count)
        self.buffer = buffer
        assembly = NBDReadAssembly(offset: offset, length: UInt64(buffer.count))
    }

    init(blockStatusAt offset: UInt64, length: UInt32) {
        type = NBDCommand.blockStatus
        self.offset = offset
        self.length = length
        buffer = nil
        assembly = NBDReadAssembly(offset: offset, length: UInt64(length))
    }
}

/// The socket in the transmission phase: a writer lock for sending, one reader thread that
/// routes replies to waiting requests by cookie.
final class NBDConnection: @unchecked Sendable {
    // @unchecked: mutable state is guarded by `cond` (see each field); the socket is written
    // under `writeLock` and read only by the reader thread.
    private let fd: Int32
    private let structured: Bool
    private let timeout: Double
    private let contextIDs: Set<UInt32>
    private let cond = NSCondition()
    private let writeLock = NSLock()

    // Guarded by `cond`.
    private var pending: [UInt64: NBDClientRequest] = [:]
    private var nextCookie: UInt64 = 1
    /// Set once: why the connection can no longer be used.
    private var brokenReason: String?
    private var closed = false
    private var readerFinished = false
    private var busySince = 0.0
    private var sentReadBytes: UInt64 = 0
    private var peak = 0
    // Guarded by `writeLock`.
    private var socketClosed = false

    init(fd: Int32, structured: Bool, timeout: Double, contextIDs: Set<UInt32>) {
        self.fd = fd
        self.structured = structured
        self.timeout = max(0.1, timeout)
        self.contextIDs = contextIDs
    }

    var bytesRequested: UInt64 {
        cond.lock()
        defer { cond.unlock() }
        return sentReadBytes
    }

    var peakInFlight: Int {
        cond.lock()
        defer { cond.unlock() }
        return peak
    }

    func start() {
        let thread = Thread { [self] in self.readLoop() }
        thread.name = "cairn-nbd-reader"
        thread.start()
    }

    /// Sends `requests` back to back and waits until every one is answered or failed.
    /// Never throws: each request carries its own `failure`.
    func perform(_ requests: [NBDClientRequest]) {
        cond.lock()
        if let reason = brokenReason {
            for r in requests {
                r.failure = .connection("the connection is no longer usable (\(reason))")
                r.isDone = true
            }
            cond.unlock()
            return
        }
        if pending.isEmpty { busySince = nbdNow() }
        var header: [UInt8] = []
        header.reserveCapacity(requests.count * NBDWire.requestHeaderSize)
        var readBytes: UInt64 = 0
        for r in requests {
            r.cookie = nextCookie
            nextCookie &+= 1
            pending[r.cookie] = r
            NBDEncode.request(into: &header, type: r.type, cookie: r.cookie, offset: r.offset, length: r.length)
            if r.type == NBDCommand.read { readBytes += UInt64(r.length) }
        }
        peak = max(peak, pending.count)
        cond.unlock()

        writeLock.lock()
        let failure: NBDSocketFailure? = socketClosed ? .closed
            : header.withUnsafeBytes { NBDSocket.send(fd, $0, deadline: nbdNow() + timeout) }
        if let failure {
            // Requests may be half sent: the stream is unusable. The reader fails every request.
            cond.lock()
            if brokenReason == nil { brokenReason = "sending a request: \(failure.reason)" }
            cond.unlock()
            if !socketClosed { _ = shutdown(fd, Int32(SHUT_RDWR)) }
        }
        writeLock.unlock()

        cond.lock()
        if failure == nil { sentReadBytes += readBytes }
        while !requests.allSatisfy(\.isDone) { cond.wait() }
        cond.unlock()
    }

    /// NBD_CMD_DISC, then the socket is shut down and closed once the reader has stopped.
    func close() {
        cond.lock()
        if closed {
            cond.unlock()
            return
        }
        closed = true
        // A soft disconnect whenever the stream is intact (also after ESHUTDOWN, as the protocol asks).
        let healthy = !readerFinished
        if brokenReason == nil { brokenReason = "closed by Cairn" }
        cond.unlock()

        writeLock.lock()
        if healthy {
            var disc: [UInt8] = []
            NBDEncode.request(into: &disc, type: NBDCommand.disconnect, cookie: 0, offset: 0, length: 0)
            _ = disc.withUnsafeBytes { NBDSocket.send(fd, $0, deadline: nbdNow() + min(timeout, 2)) }
        }
        _ = shutdown(fd, Int32(SHUT_RDWR))
        writeLock.unlock()

        cond.lock()
        let deadline = Date().addingTimeInterval(5)
        while !readerFinished && cond.wait(until: deadline) {}
        let finished = readerFinished
        cond.unlock()
        // Close only once the reader is out of recv(), so the number cannot be reused under it.
        if finished {
            writeLock.lock()
            socketClosed = true
            _ = Glibc.close(fd)
            writeLock.unlock()
        }
    }

    // MARK: Reader

    private func readLoop() {
        let fd = self.fd
        var receiver = NBDReceiver(fd: fd) { () throws(NBDSocketFailure) in
            // Called when everything received so far is consumed: the server last sent
            // something just now. Wait in slices so that a silent server is noticed.
            let entered = nbdNow()
            while true {
                var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                let rc = poll(&p, 1, 250)
                if rc > 0 || (rc < 0 && errno != EINTR) { return }
                let (busy, since) = self.busyState()
                if busy, nbdNow() - max(since, entered) > self.timeout {
                    throw .timedOut("no reply from the server within \(QMPClient.seconds(self.timeout))")
                }
            }
        }
        var reason: NBDSocketFailure
        do throws(NBDSocketFailure) {
            while true { try readReply(&receiver) }
        } catch {
            reason = error
        }
        cond.lock()
        let message: String
        if let existing = brokenReason {
            message = existing
        } else {
            message = reason.reason
            brokenReason = message
        }
        let waiting = pending.values
        pending.removeAll()
        for r in waiting {
            r.failure = .connection(message)
            r.isDone = true
        }
        readerFinished = true
        cond.broadcast()
        cond.unlock()
        // A violation leaves the stream in an unknown state: hang up (the protocol allows it).
        writeLock.lock()
        if !socketClosed { _ = shutdown(fd, Int32(SHUT_RDWR)) }
        writeLock.unlock()
    }

    private func busyState() -> (Bool, Double) {
        cond.lock()
        defer { cond.unlock() }
        return (!pending.isEmpty, busySince)
    }

    private func request(_ cookie: UInt64) throws(NBDSocketFailure) -> NBDClientRequest {
        cond.lock()
        let r = pending[cookie]
        cond.unlock()
        guard let r else { throw .violation("a reply for cookie \(cookie), which no request is waiting for") }
        return r
    }

    /// Ends `r`: checks that a successful read got every byte, wakes its caller.
    private func finish(_ r: NBDClientRequest) throws(NBDSocketFailure) {
        if r.serverError == nil, r.type == NBDCommand.read, !r.assembly.isComplete {
            throw .violation("the reply to a read of \(r.length) bytes at offset \(r.offset) ended after \(r.assembly.deliveredBytes) bytes")
        }
        cond.lock()
        pending.removeValue(forKey: r.cookie)
        r.failure = r.serverError
        r.isDone = true
        if case .server(let code, _, _) = r.serverError, code == NBDError.shutdown, brokenReason == nil {
            brokenReason = "the server is shutting down (ESHUTDOWN)"
        }
        cond.broadcast()
        cond.unlock()
    }

    private func readReply(_ rx: inout NBDReceiver) throws(NBDSocketFailure) {
        var head = try rx.bytes(NBDWire.simpleHeaderSize)
        var decoded = NBDReplyHeader.decode(head)
        if case .success(.needMore) = decoded {
            head += try rx.bytes(NBDWire.chunkHeaderSize - NBDWire.simpleHeaderSize)
            decoded = NBDReplyHeader.decode(head)
        }
        let header: NBDReplyHeader
        switch decoded {
        case .failure(let v): throw .violation(v.message)
        case .success(let h): header = h
        }
        switch header {
        case .needMore:
            throw .violation("an incomplete reply header")
        case .simple(let error, let cookie):
            let r = try request(cookie)
            if error != 0 {
                r.serverError = .server(code: error, message: "", offset: nil)
            } else if r.type == NBDCommand.read, let buffer = r.buffer {
                guard !structured else { throw .violation("a simple reply with data to a read after structured replies were agreed") }
                try rx.read(into: buffer)
                _ = r.assembly.claim(r.offset, count: UInt64(r.length))
            } else {
                throw .violation("a simple reply without data to a block status request")
            }
            try finish(r)
        case .chunk(let flags, let type, let cookie, let length):
            guard structured else { throw .violation("a structured reply chunk though structured replies were not agreed") }
            let r = try request(cookie)
            if type == NBDReplyType.none, flags & NBDReplyType.flagDone == 0 {
                throw .violation("an NBD_REPLY_TYPE_NONE chunk without the DONE flag")
            }
            try chunk(type: type, length: length, for: r, &rx)
            if flags & NBDReplyType.flagDone != 0 { try finish(r) }
        }
    }

    private func chunk(type: UInt16, length: UInt32, for r: NBDClientRequest, _ rx: inout NBDReceiver) throws(NBDSocketFailure) {
        if type == NBDReplyType.offsetData {
            guard r.type == NBDCommand.read, let buffer = r.buffer else { throw .violation("an OFFSET_DATA chunk in the reply to block status") }
            guard length > 8 else { throw .violation("an OFFSET_DATA chunk of \(length) bytes (at least 9 expected)") }
            var o = NBDByteReader(try rx.bytes(8))
            let start = o.u64() ?? 0
            switch r.assembly.claim(start, count: UInt64(length) - 8) {
            case .failure(let v): throw .violation(v.message)
            case .success(let at): try rx.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[at..<at + Int(length - 8)]))
            }
            return
        }
        let limit: UInt32 = switch type {
        case NBDReplyType.none: 0
        case NBDReplyType.offsetHole: 12
        case NBDReplyType.blockStatus: NBDWire.maxBlockStatusPayload
        default: NBDWire.maxErrorPayload
        }
        guard length <= limit else { throw .violation("a chunk of type \(type) with \(length) bytes of payload (at most \(limit) expected)") }
        let payload = try rx.bytes(Int(length))
        switch NBDChunkPayload.decode(type: type, payload) {
        case .failure(let v):
            throw .violation(v.message)
        case .success(.none):
            break
        case .success(.hole(let offset, let count)):
            guard r.type == NBDCommand.read, let buffer = r.buffer else { throw .violation("an OFFSET_HOLE chunk in the reply to block status") }
            switch r.assembly.claim(offset, count: UInt64(count)) {
            case .failure(let v): throw .violation(v.message)
            case .success(let at): UnsafeMutableRawBufferPointer(rebasing: buffer[at..<at + Int(count)]).initializeMemory(as: UInt8.self, repeating: 0)
            }
        case .success(.blockStatus(let context, let descriptors)):
            guard r.type == NBDCommand.blockStatus else { throw .violation("a BLOCK_STATUS chunk in the reply to a read") }
            guard contextIDs.contains(context) else { throw .violation("a BLOCK_STATUS chunk for context id \(context), which was not negotiated") }
            guard r.statuses[context] == nil else { throw .violation("two BLOCK_STATUS chunks for context id \(context) in one reply") }
            r.statuses[context] = descriptors
        case .success(.error(let code, let message, let offset)):
            if r.serverError == nil { r.serverError = .server(code: code, message: message, offset: offset) }
        }
    }
}
