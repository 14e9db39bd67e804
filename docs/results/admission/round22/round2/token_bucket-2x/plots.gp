set terminal png size 1000,600
set grid
set key top left
set output 'rate_goodput.png'
set yrange [0:*]
set offsets 0, 0, graph 0.1, 0
set title 'Arrival rate, completions and goodput (1 s buckets)'
set xlabel 'time (s)'
set ylabel 'requests / s'
plot 'timeseries.dat' using 1:2 with steps title 'sent', \
     '' using 1:3 with steps title 'ok', \
     '' using 1:4 with steps lw 2 title 'goodput (within SLOs)'
set output 'ttft.png'
set title 'TTFT by send time (ok requests)'
set ylabel 'TTFT (ms)'
set offsets 0, 0, 0, 0
set datafile separator ','
set datafile missing 'nan'
plot 'requests.csv' every ::1 using ($3/1000):5 with points pt 7 ps 0.4 title 'TTFT', 4285.3 with lines lw 2 title 'SLO'
set datafile separator whitespace
set output 'latency_cdf.png'
set title 'Latency CDFs (ok requests)'
set xlabel 'latency (ms)'
set ylabel 'fraction of requests'
set logscale x
set key bottom right
plot 'cdf.dat' index 0 using 1:2 with steps title 'TTFT', \
     '' index 1 using 1:2 with steps title 'TPOT', \
     '' index 2 using 1:2 with steps title 'e2e'
