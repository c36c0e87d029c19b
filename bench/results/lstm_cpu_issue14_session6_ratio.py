import time, torch, sys, kiln, statistics as st
from kiln.kernels.cpu import rnn as K
torch.manual_seed(0)
T,B,I,H,L = [int(a) for a in sys.argv[1:6]]; grad = sys.argv[6]=="1"
theirs = torch.nn.LSTM(I,H,num_layers=L); ours = kiln.nn.LSTM(I,H,num_layers=L); ours.load_state_dict(theirs.state_dict())
x = torch.randn(T,B,I, requires_grad=grad)
if not grad:
    for p in (*theirs.parameters(), *ours.parameters()): p.requires_grad_(False)
ws = [(getattr(theirs,f"weight_ih_l{l}").detach(), getattr(theirs,f"weight_hh_l{l}").detach(), (getattr(theirs,f"bias_ih_l{l}")+getattr(theirs,f"bias_hh_l{l}")).detach()) for l in range(L)]
h0=torch.zeros(B,H); c0=torch.zeros(B,H)
def pieces():
    xx = x.detach()
    for w_ih,w_hh,b in ws:
        gx = torch.nn.functional.linear(xx,w_ih,b)
        h_all, c_all, gates = K.lstm_sequence_forward(gx,h0,c0,w_hh)
        xx = h_all
def run(m):
    y = m(x)[0]
    if grad: y.sum().backward()
fs = {"kiln": lambda: run(ours), "torch": lambda: run(theirs), "pieces(fwd)": pieces}
for f in fs.values():
    for _ in range(10): f()
res = {k: [] for k in fs}
for r in range(15):
    for k,f in fs.items():
        ts=[]
        for _ in range(20):
            t0=time.perf_counter(); f(); ts.append(time.perf_counter()-t0)
        res[k].append(sorted(ts)[10]*1e3)
print(sys.argv[1:], {k: round(st.median(v),3) for k,v in res.items()}, "torch/kiln", round(st.median([t/k for t,k in zip(res["torch"],res["kiln"])]),3))
